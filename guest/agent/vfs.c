/*
 * The vfs relay (host folders, issue #13): the guest kernel's FUSE file system at the workspace is
 * answered by the host. Two processes copy raw FUSE messages, one each way, unchanged:
 *   kernel -> host: one read() of /dev/fuse is one request; it goes to the port whole;
 *   host -> kernel: every FUSE message starts with its length (u32 LE), so the port's bytes are cut
 *                   on it and each reply (or notification) is written to /dev/fuse in one write().
 * No framing, no file logic, no policy: what a request means and what it may touch is the host's.
 * Two processes rather than one poll loop: a write to the port may block while the host is busy,
 * and the kernel needs replies (and notifications) written by someone other than the reader.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FUSE_IN_HEADER 40u /* sizeof(struct fuse_in_header) */
#define FUSE_OUT_HEADER 16u /* sizeof(struct fuse_out_header) */

static int read_exact(int fd, unsigned char *buf, size_t n)
{
	size_t off = 0;
	while (off < n) {
		ssize_t r = read(fd, buf + off, n - off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		off += (size_t)r;
	}
	return 0;
}

/* kernel -> host: until the file system is unmounted (ENODEV) or the port breaks */
static void kernel_to_host(int fuse, int port)
{
	unsigned char *buf = xrealloc(NULL, VFS_MAX_MESSAGE);
	for (;;) {
		ssize_t n = read(fuse, buf, VFS_MAX_MESSAGE);
		if (n < 0) {
			/* ENOENT: the request was interrupted before we read it */
			if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
				continue;
			if (errno != ENODEV)
				console("vfs: read /dev/fuse: %s", strerror(errno));
			_exit(0);
		}
		if (n < (ssize_t)FUSE_IN_HEADER || get_u32(buf) != (uint32_t)n) {
			console("vfs: a %zd-byte read from /dev/fuse is not one request", n);
			continue;
		}
		if (write_all(port, buf, (size_t)n) < 0) {
			console("vfs: write to the port: %s", strerror(errno));
			_exit(1);
		}
	}
}

/* host -> kernel: a length outside the buffer cannot be resynchronised, so the relay ends */
static void host_to_kernel(int fuse, int port)
{
	unsigned char *buf = xrealloc(NULL, VFS_MAX_MESSAGE);
	for (;;) {
		if (read_exact(port, buf, 4) < 0)
			_exit(0);
		uint32_t len = get_u32(buf);
		if (len < FUSE_OUT_HEADER || len > VFS_MAX_MESSAGE) {
			console("vfs: the host sent a %u-byte message; the relay stops", len);
			_exit(1);
		}
		if (read_exact(port, buf + 4, len - 4) < 0)
			_exit(0);
		/* ENOENT: the request was interrupted meanwhile and its reply is not wanted */
		if (write(fuse, buf, len) < 0 && errno != ENOENT && errno != EINVAL)
			console("vfs: write /dev/fuse: %s", strerror(errno));
	}
}

static pid_t relay(void (*copy)(int, int), int fuse, int port)
{
	pid_t pid = fork();
	if (pid < 0) {
		console("vfs: fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		prctl(PR_SET_NAME, "matchlock-vfs");
		copy(fuse, port);
		_exit(0);
	}
	return pid;
}

/* Mounts the host's file system at `path` and starts the relay. Not fatal: without it the VM still
 * runs commands, and they see an error where the folder should be. */
void start_vfs(const char *path, int port)
{
	char opts[192];
	int fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fuse < 0) {
		console("vfs: open /dev/fuse: %s", strerror(errno));
		return;
	}
	snprintf(opts, sizeof opts,
		 "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions", fuse);
	if (mkdir_p(path, 0755, (uid_t)-1, (gid_t)-1) < 0 ||
	    mount("matchlock", path, "fuse.matchlock", MS_NOSUID | MS_NODEV, opts) < 0) {
		console("vfs: mount %s: %s", path, strerror(errno));
		close(fuse);
		return;
	}
	relay(kernel_to_host, fuse, port);
	relay(host_to_kernel, fuse, port);
	close(fuse);
	close(port);
}
