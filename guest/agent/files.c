/* matchlock guest agent: WRITE_FILE, READ_FILE, LIST_DIR. */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct wfile **wfiles;
size_t n_wfiles;
struct rfile **rfiles;
size_t n_rfiles;

/* Record the first error of a WRITE_FILE; later FILE_DATA is discarded. */
static void wfile_error(struct wfile *w, const char *op, const char *path, int err)
{
	if (!w->err) {
		w->err = err;
		snprintf(w->msg, sizeof w->msg, "%s %s: %s", op, path, strerror(err));
	}
	close_fd(&w->fd);
	if (w->opened) {
		unlink(w->path);
		w->opened = 0;
	}
}

/* Only a regular file is removed after a failed write: never a device, FIFO or socket. */
static int is_regular(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

void do_write_file(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct wfile *w = xrealloc(NULL, sizeof *w);
	*w = (struct wfile){ .stream = stream, .fd = -1 };
	vec_add((void ***)&wfiles, &n_wfiles, w);
	if (len < 5 || p[len - 1] != 0) {
		w->err = EINVAL;
		snprintf(w->msg, sizeof w->msg, "write_file: malformed payload");
		return;
	}
	uint32_t word = get_u32(p);
	mode_t mode = w->mode = word & 07777;
	w->path = xstrdup((const char *)p + 4);
	struct stat st;
	/* WRITE_REPLACE_LINK: a symlink here (resolv.conf → systemd's stub) is replaced, not followed */
	if ((word & WRITE_REPLACE_LINK) && lstat(w->path, &st) == 0 && S_ISLNK(st.st_mode) && unlink(w->path) < 0) {
		wfile_error(w, "unlink", w->path, errno);
		return;
	}
	char *dir = xstrdup(w->path), *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		if (mkdir_p(dir, 0755, (uid_t)-1, (gid_t)-1) < 0)
			wfile_error(w, "mkdir", dir, errno);
	}
	free(dir);
	if (w->err)
		return;
	w->fd = open(w->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (w->fd < 0) {
		wfile_error(w, "open", w->path, errno);
		return;
	}
	w->opened = is_regular(w->fd);
	if (fchmod(w->fd, mode) < 0)  /* exactly this mode, whatever the umask or an old file's mode */
		wfile_error(w, "chmod", w->path, errno);
}

static struct wfile *find_wfile(uint32_t stream)
{
	for (size_t i = 0; i < n_wfiles; i++)
		if (wfiles[i]->stream == stream)
			return wfiles[i];
	return NULL;
}

/* RESULT (the first error, if any), then forget the write. */
static void wfile_finish(struct wfile *w)
{
	send_result(w->stream, w->err, w->err ? w->msg : "");
	vec_del((void **)wfiles, &n_wfiles, w);
	free(w->path);
	free(w);
}

void do_file_data(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct wfile *w = find_wfile(stream);
	if (!w)
		return;
	if (len > 0) {
		if (w->fd >= 0 && write_all(w->fd, p, len) < 0)
			wfile_error(w, "write", w->path, errno);
		return;
	}
	if (w->fd >= 0) {
		int fd = w->fd;
		w->fd = -1;
		/* again: an unprivileged writer loses setuid/setgid bits on write */
		if (fchmod(fd, w->mode) < 0)
			wfile_error(w, "chmod", w->path, errno);
		if (close(fd) < 0)
			wfile_error(w, "close", w->path, errno);
	}
	wfile_finish(w);
}

void do_read_file(uint32_t stream, const unsigned char *p, uint32_t len)
{
	if (len < 1 || p[len - 1] != 0) {
		send_result(stream, EINVAL, "read_file: malformed payload");
		return;
	}
	const char *path = (const char *)p;
	/* O_NONBLOCK: a FIFO must not block the agent at open; the fd is polled like a pipe */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		char msg[1024];
		int err = errno;
		snprintf(msg, sizeof msg, "open %s: %s", path, strerror(err));
		send_result(stream, err, msg);
		return;
	}
	struct rfile *f = xrealloc(NULL, sizeof *f);
	*f = (struct rfile){ .stream = stream, .fd = fd, .path = xstrdup(path) };
	vec_add((void ***)&rfiles, &n_rfiles, f);
}

/* One chunk per loop iteration, so a big file does not starve the other streams. */
static void rfile_free(struct rfile *f)
{
	close(f->fd);
	vec_del((void **)rfiles, &n_rfiles, f);
	free(f->path);
	free(f);
}

void pump_read_file(struct rfile *f)
{
	static unsigned char buf[CHUNK];
	size_t room = WINDOW - f->unacked;
	if (f->unacked >= WINDOW)
		return;
	ssize_t n = read(f->fd, buf, room < sizeof buf ? room : sizeof buf);
	if (n > 0) {
		f->unacked += (uint32_t)n;
		send_frame(G_DATA, f->stream, buf, (size_t)n);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n == 0) {
		send_result(f->stream, 0, "");
	} else {
		char msg[1024];
		int err = errno;
		snprintf(msg, sizeof msg, "read %s: %s", f->path, strerror(err));
		send_result(f->stream, err, msg);
	}
	rfile_free(f);
}

struct rfile *find_rfile(uint32_t stream)
{
	for (size_t i = 0; i < n_rfiles; i++)
		if (rfiles[i]->stream == stream)
			return rfiles[i];
	return NULL;
}

void do_list_dir(uint32_t stream, const unsigned char *p, uint32_t len)
{
	static unsigned char buf[CHUNK];
	size_t used = 0;
	if (len < 1 || p[len - 1] != 0) {
		send_result(stream, EINVAL, "list_dir: malformed payload");
		return;
	}
	const char *path = (const char *)p;
	DIR *d = opendir(path);
	if (!d) {
		char msg[1024];
		int err = errno;
		snprintf(msg, sizeof msg, "opendir %s: %s", path, strerror(err));
		send_result(stream, err, msg);
		return;
	}
	struct dirent *de;
	errno = 0;
	while ((de = readdir(d))) {
		struct stat st;
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue;  /* vanished meanwhile */
		size_t nl = strlen(de->d_name) + 1, need = 4 + 8 + 8 + 4 + nl;
		if (used + need > sizeof buf) {
			send_frame(G_DATA, stream, buf, used);
			used = 0;
		}
		unsigned char *q = buf + used;
		put_u32(q, st.st_mode);
		put_u64(q + 4, (uint64_t)st.st_size);
		put_u64(q + 12, (uint64_t)st.st_mtim.tv_sec);
		put_u32(q + 20, (uint32_t)st.st_mtim.tv_nsec);
		memcpy(q + 24, de->d_name, nl);
		used += need;
		errno = 0;
	}
	int err = errno;
	closedir(d);
	if (used)
		send_frame(G_DATA, stream, buf, used);
	if (err) {
		char msg[1024];
		snprintf(msg, sizeof msg, "readdir %s: %s", path, strerror(err));
		send_result(stream, err, msg);
	} else {
		send_result(stream, 0, "");
	}
}

int close_file(uint32_t stream)
{
	struct rfile *f;
	struct wfile *w;
	if ((f = find_rfile(stream))) {
		send_result(stream, ECANCELED, "read cancelled by the host");
		rfile_free(f);
	} else if ((w = find_wfile(stream))) {
		wfile_error(w, "write", w->path ? w->path : "", ECANCELED);
		wfile_finish(w);
	} else {
		return 0;
	}
	return 1;
}
