/* matchlock guest agent: memory, fds, logging (see agent.h). */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p) {
		/* nothing sensible to do without memory; the host sees the agent die */
		dprintf(2, "matchlock-agent: out of memory\n");
		_exit(1);
	}
	return p;
}

char *xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	return memcpy(xrealloc(NULL, n), s, n);
}

/* Console output: init errors (before the port exists) and last words. */
void console(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(2, "matchlock-agent: %s\n", buf);
}

/* Fatal: in a VM power off at once so the host notices; QEMU runs with -no-reboot. */
void fatal(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(2, "matchlock-agent: fatal: %s\n", buf);
	if (is_init) {
		sync();
		reboot(RB_POWER_OFF);
	} else {
		shutdown_children();
	}
	_exit(1);
}

int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) { /* only if someone made the fd non-blocking */
				struct pollfd pfd = { .fd = fd, .events = POLLOUT };
				poll(&pfd, 1, -1);
				continue;
			}
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* mkdir -p with mode for every missing component; the ones it creates are given to uid:gid
 * unless uid is (uid_t)-1. */
int mkdir_p(const char *path, mode_t mode, uid_t uid, gid_t gid)
{
	char *p = strdup(path);
	int ret = 0;
	if (!p)
		return -1;
	for (char *s = p + 1;; s++) {
		if (*s == '/' || *s == 0) {
			char c = *s;
			*s = 0;
			if (mkdir(p, mode) == 0) {
				if (uid != (uid_t)-1 && chown(p, uid, gid) < 0) {
					ret = -1;
					break;
				}
			} else if (errno != EEXIST) {
				ret = -1;
				break;
			}
			*s = c;
			if (!c)
				break;
		}
	}
	free(p);
	return ret;
}

/* Pointer arrays: append, and remove by swapping in the last element. */
void vec_add(void ***v, size_t *n, void *p)
{
	*v = xrealloc(*v, (*n + 1) * sizeof **v);
	(*v)[(*n)++] = p;
}

void vec_del(void **v, size_t *n, void *p)
{
	for (size_t i = 0; i < *n; i++)
		if (v[i] == p) {
			v[i] = v[--*n];
			return;
		}
}

/* Append to a write buffer whose first *off bytes are written already; their space is reused, so the
 * buffer stays as small as what is pending (at most the host's window). */
void buf_append(unsigned char **buf, size_t *len, size_t *off, size_t *cap, const void *p, size_t n)
{
	if (*len + n > *cap && *off) {
		memmove(*buf, *buf + *off, *len - *off);
		*len -= *off;
		*off = 0;
	}
	if (*len + n > *cap)
		*buf = xrealloc(*buf, *cap = *len + n);
	memcpy(*buf + *len, p, n);
	*len += n;
}

void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}
