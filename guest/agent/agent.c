/*
 * matchlock guest agent.
 *
 * PID 1 of every matchlock VM: sets up the root filesystem (see "Init (PID 1) steps" in
 * docs/agent-protocol.md), then serves the agent protocol on the virtio-serial port "agent".
 * With `--stdio` (not PID 1) it skips init and serves on stdin/stdout, so the protocol can be
 * tested on a host without a VM.
 *
 * Mechanism only: the host decides everything, the agent does what it is told.
 * Single-threaded: one poll() loop over the port, a signalfd (SIGCHLD), the pipes/PTYs of running
 * processes, open READ_FILE files and port-forward TCP sockets. Only writes to the port block.
 *
 * Build: cc -static -Os -s -Wall -Wextra -o matchlock-agent agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <arpa/inet.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "matchlock-agent 1"
#endif

#define HDR 9                    /* u32 len, u8 type, u32 stream */
#define MAX_PAYLOAD (1u << 20)   /* protocol limit, both directions */
#define CHUNK (64 * 1024)        /* one read of process output / file content */
#define WINDOW (256 * 1024)      /* flow control: most bytes unacknowledged per stream and direction */
/* Every guest->host byte stream (process output, READ_FILE content, TCP data) is credit-based: we
 * send at most WINDOW bytes the host has not ACKed, and stop reading the source at the limit, so a
 * slow reader on the host stalls the writer in the guest instead of filling anyone's memory. */
#define DRAIN_MAX (4u << 20)     /* bound on draining an exited process's pipe (a grandchild may keep writing) */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* host -> guest */
enum { T_EXEC = 0x01, T_STDIN, T_RESIZE, T_SIGNAL, T_WRITE_FILE, T_FILE_DATA, T_READ_FILE, T_LIST_DIR,
       T_PING, T_SHUTDOWN, T_TCP_CONNECT, T_TCP_DATA, T_CLOSE, T_ACK };
/* guest -> host */
enum { T_READY = 0x80, T_STDOUT, T_STDERR, T_EXIT, T_ERROR, T_STARTED, T_STDIN_ACK, T_DATA, T_RESULT,
       T_PONG, T_LOG, T_TCP_CONNECTED, T_TCP_READ /* TCP_DATA guest->host */, T_TCP_CLOSED };

#define F_TTY 1u
#define F_STDIN 2u
#define F_MKDIR_CWD 4u

static int is_init;               /* PID 1 in a VM (else --stdio) */
static int port_in = -1, port_out = -1;
static int port_hup;              /* VM: host side not connected; back off instead of spinning */

/* ---------- small helpers ---------- */

static void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint16_t get_u16(const unsigned char *p) { return p[0] | p[1] << 8; }
static uint32_t get_u32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p) {
		/* nothing sensible to do without memory; the host sees the agent die */
		dprintf(2, "matchlock-agent: out of memory\n");
		_exit(1);
	}
	return p;
}

static char *xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	return memcpy(xrealloc(NULL, n), s, n);
}

/* Console output: init errors (before the port exists) and last words. */
static void console(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(2, "matchlock-agent: %s\n", buf);
}

static void shutdown_children(void);

/* Fatal: in a VM power off at once so the host notices; QEMU runs with -no-reboot. */
static void fatal(const char *fmt, ...)
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

static int write_all(int fd, const void *buf, size_t n)
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
static int mkdir_p(const char *path, mode_t mode, uid_t uid, gid_t gid)
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

/* ---------- frames out ---------- */

static unsigned char obuf[HDR + MAX_PAYLOAD];

static void send2(uint8_t type, uint32_t stream, const void *a, size_t alen, const void *b, size_t blen)
{
	size_t len = alen + blen;
	if (len > MAX_PAYLOAD)
		len = MAX_PAYLOAD, blen = len - alen; /* callers stay far below; never break framing */
	put_u32(obuf, (uint32_t)len);
	obuf[4] = type;
	put_u32(obuf + 5, stream);
	if (alen)
		memcpy(obuf + HDR, a, alen);
	if (blen)
		memcpy(obuf + HDR + alen, b, blen);
	if (write_all(port_out, obuf, HDR + len) < 0) {
		if (!is_init) {
			/* --stdio: the host went away; same as EOF on stdin */
			shutdown_children();
			exit(0);
		}
		/* VM: the host end is gone or not connected (ENODEV...); drop the frame */
		static int reported;
		if (!reported++)
			console("write to port: %s", strerror(errno));
	}
}

static void send_frame(uint8_t type, uint32_t stream, const void *p, size_t len)
{
	send2(type, stream, p, len, NULL, 0);
}

static void send_u32(uint8_t type, uint32_t stream, uint32_t v)
{
	unsigned char b[4];
	put_u32(b, v);
	send_frame(type, stream, b, 4);
}

static void send_log(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	send_frame(T_LOG, 0, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void send_exit(uint32_t stream, int32_t code, int32_t sig)
{
	unsigned char b[8];
	put_u32(b, (uint32_t)code);
	put_u32(b + 4, (uint32_t)sig);
	send_frame(T_EXIT, stream, b, 8);
}

static void send_result(uint32_t stream, int err, const char *msg)
{
	unsigned char b[4];
	put_u32(b, (uint32_t)err);
	send2(T_RESULT, stream, b, 4, msg, strlen(msg));
}

/* ---------- state ---------- */

struct exec {
	uint32_t stream;
	pid_t pid;
	int tty;
	int out_fd, err_fd;  /* stdout/stderr pipe read ends, or the PTY master (out_fd); -1 once closed */
	int in_fd;           /* stdin pipe write end, or a dup of the PTY master; -1 if none/closed */
	unsigned char *in_buf;
	size_t in_len, in_off, in_cap;
	int in_eof;          /* host sent EOF: close (pipe) or write ^D (TTY) once in_buf is flushed */
	int in_dead;         /* the process closed its stdin: discard (and still ACK) further bytes */
	uint32_t unacked;    /* STDOUT+STDERR bytes sent and not yet ACKed; we read only below WINDOW */
	int exited;          /* reaped: drain what is left in the pipes, then EXIT */
	int status;          /* wait status, once exited */
	size_t drained;      /* bytes forwarded since the exit (bounded by DRAIN_MAX) */
	int idle[2];         /* after the exit: stdout/stderr found empty (EAGAIN) */
};

struct wfile {
	uint32_t stream;
	int fd;
	int err;             /* first error, reported in RESULT */
	char *path;
	mode_t mode;
	int opened;          /* we created or truncated a regular file: on failure it is removed, never left half-written */
	char msg[1024];
};

struct rfile {
	uint32_t stream;
	int fd;
	char *path;
	uint32_t unacked;    /* DATA bytes sent and not yet ACKed */
};

/* A port-forward connection. Each direction ends on its own (half-close); TCP_CLOSED once both did. */
struct tcp {
	uint32_t stream;
	int fd;
	int connecting;      /* connect() in progress: POLLOUT, then SO_ERROR tells the outcome */
	unsigned char *buf;  /* host->guest bytes not yet written; those before off are written */
	size_t len, off, cap;
	int host_eof;        /* the host sent an empty TCP_DATA: SHUT_WR once buf is flushed */
	int wr_done;         /* host->guest over: SHUT_WR done, or a write failed (err set) */
	int rd_eof;          /* guest->host over: EOF read, empty TCP_DATA sent */
	uint32_t unacked;    /* guest->host bytes sent and not yet TCP_ACKed; we read only below WINDOW */
	int err;             /* first socket error, for TCP_CLOSED */
};

static struct exec **execs;
static size_t n_execs;
static struct wfile **wfiles;
static size_t n_wfiles;
static struct rfile **rfiles;
static size_t n_rfiles;
static struct tcp **tcps;
static size_t n_tcps;

/* Pointer arrays: append, and remove by swapping in the last element. */
static void vec_add(void ***v, size_t *n, void *p)
{
	*v = xrealloc(*v, (*n + 1) * sizeof **v);
	(*v)[(*n)++] = p;
}

static void vec_del(void **v, size_t *n, void *p)
{
	for (size_t i = 0; i < *n; i++)
		if (v[i] == p) {
			v[i] = v[--*n];
			return;
		}
}

/* Append to a write buffer whose first *off bytes are written already; their space is reused, so the
 * buffer stays as small as what is pending (at most the host's window). */
static void buf_append(unsigned char **buf, size_t *len, size_t *off, size_t *cap, const void *p, size_t n)
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

static struct exec *find_exec(uint32_t stream)
{
	for (size_t i = 0; i < n_execs; i++)
		if (execs[i]->stream == stream)
			return execs[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* --stdio: on EOF/SHUTDOWN nothing may outlive the agent. */
static void shutdown_children(void)
{
	for (size_t i = 0; i < n_execs; i++)
		if (kill(-execs[i]->pid, SIGKILL) < 0)
			kill(execs[i]->pid, SIGKILL);
}

/* ---------- users ---------- */

static int is_number(const char *s)
{
	if (!*s || strlen(s) > 10)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

/* Split a colon-separated line in place; returns the number of fields. */
static int split_fields(char *line, char **f, int max)
{
	int n = 0;
	line[strcspn(line, "\n")] = 0;
	while (n < max) {
		f[n++] = line;
		char *c = strchr(line, ':');
		if (!c)
			break;
		*c = 0;
		line = c + 1;
	}
	return n;
}

/*
 * Hand-parsed /etc/passwd (glibc's NSS does not work in a static binary).
 * Look up by name if name != NULL, else by uid. Returns 1 if found.
 */
static int pw_lookup(const char *name, uid_t uid, uid_t *o_uid, gid_t *o_gid, char *home, size_t homesz)
{
	FILE *f = fopen("/etc/passwd", "re");
	char *line = NULL, *fl[7];
	size_t cap = 0;
	int found = 0;
	if (!f)
		return 0;
	while (!found && getline(&line, &cap, f) > 0) {
		if (split_fields(line, fl, 7) < 7 || !is_number(fl[2]) || !is_number(fl[3]))
			continue;
		uid_t u = (uid_t)strtoul(fl[2], NULL, 10);
		if (name ? strcmp(fl[0], name) == 0 : u == uid) {
			found = 1;
			*o_uid = u;
			*o_gid = (gid_t)strtoul(fl[3], NULL, 10);
			snprintf(home, homesz, "%s", fl[5]);
		}
	}
	free(line);
	fclose(f);
	return found;
}

static int gr_lookup(const char *name, gid_t *o_gid)
{
	FILE *f = fopen("/etc/group", "re");
	char *line = NULL, *fl[4];
	size_t cap = 0;
	int found = 0;
	if (!f)
		return 0;
	while (!found && getline(&line, &cap, f) > 0) {
		if (split_fields(line, fl, 4) < 3 || !is_number(fl[2]))
			continue;
		if (strcmp(fl[0], name) == 0) {
			found = 1;
			*o_gid = (gid_t)strtoul(fl[2], NULL, 10);
		}
	}
	free(line);
	fclose(f);
	return found;
}

/* The `user` rules of docs/agent-protocol.md. Returns 0, or -1 with err filled. */
static int resolve_user(const char *spec, uid_t *uid, gid_t *gid, char *home, size_t homesz, char *err,
			size_t errsz)
{
	char buf[512], *gpart;
	uid_t pu;
	gid_t pg;
	snprintf(buf, sizeof buf, "%s", spec);
	gpart = strchr(buf, ':');
	if (gpart)
		*gpart++ = 0;
	snprintf(home, homesz, "/");
	if (!*buf && !gpart) {
		/* empty = root; an unprivileged --stdio agent can only run as itself */
		*uid = geteuid() == 0 ? 0 : getuid();
		*gid = geteuid() == 0 ? 0 : getgid();
		if (pw_lookup(NULL, *uid, &pu, &pg, home, homesz) && !*home)
			snprintf(home, homesz, "/");
		return 0;
	}
	if (is_number(buf)) {
		*uid = (uid_t)strtoul(buf, NULL, 10);
		*gid = 0;
		if (pw_lookup(NULL, *uid, &pu, &pg, home, homesz))
			*gid = pg;
	} else if (!*buf || !pw_lookup(buf, 0, uid, gid, home, homesz)) {
		snprintf(err, errsz, "user \"%s\": no such user", spec);
		return -1;
	}
	if (!*home)
		snprintf(home, homesz, "/");
	if (gpart) {
		if (is_number(gpart)) {
			*gid = (gid_t)strtoul(gpart, NULL, 10);
		} else if (!*gpart || !gr_lookup(gpart, gid)) {
			snprintf(err, errsz, "user \"%s\": no such group", spec);
			return -1;
		}
	}
	return 0;
}

/* ---------- EXEC ---------- */

/* What a child that fails before execve tells the parent (through a CLOEXEC pipe). */
struct report {
	int err;
	int at_exec;  /* the failure is execve's: 127/126 exit codes apply */
	char what[512];
};

static void child_fail(int rfd, int at_exec, int err, const char *fmt, ...)
{
	struct report r = { .err = err, .at_exec = at_exec };
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r.what, sizeof r.what, fmt, ap);
	va_end(ap);
	if (write(rfd, &r, sizeof r) < 0) {
		/* nothing left to tell anyone */
	}
	_exit(127);
}

static const char *env_get(char **envp, const char *key)
{
	size_t kl = strlen(key);
	for (; *envp; envp++)
		if (strncmp(*envp, key, kl) == 0 && (*envp)[kl] == '=')
			return *envp + kl + 1;
	return NULL;
}

/* execve with the PATH search of the given environment (execvp semantics, minus the sh fallback). */
static int exec_path(char **argv, char **envp)
{
	const char *path, *p;
	int saw_eacces = 0;
	if (strchr(argv[0], '/')) {
		execve(argv[0], argv, envp);
		return errno;
	}
	path = env_get(envp, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	size_t al = strlen(argv[0]);
	char *buf = malloc(strlen(path) + al + 2);
	if (!buf)
		return ENOMEM;
	for (p = path;; p++) {
		const char *end = strchrnul(p, ':');
		size_t dl = (size_t)(end - p);
		if (dl == 0)
			buf[0] = '.', dl = 1;  /* empty PATH entry = current directory */
		else
			memcpy(buf, p, dl);
		buf[dl] = '/';
		memcpy(buf + dl + 1, argv[0], al + 1);
		execve(buf, argv, envp);
		if (errno == EACCES)
			saw_eacces = 1;
		else if (errno != ENOENT && errno != ENOTDIR)
			return errno;
		p = end;
		if (!*p)
			break;
	}
	return saw_eacces ? EACCES : ENOENT;
}

struct exec_req {
	uint32_t flags;
	const char *cwd;
	char **argv, **envp;
	uid_t uid;
	gid_t gid;
	int switch_user;
	const char *slave;   /* TTY: PTY slave path */
	int in_r, out_w, err_w;
};

static void child_main(const struct exec_req *r, int rfd)
{
	sigset_t none;
	struct sigaction dfl = { .sa_handler = SIG_DFL };

	/* a clean slate: the agent blocks SIGCHLD and ignores SIGPIPE */
	for (int s = 1; s < NSIG; s++)
		sigaction(s, &dfl, NULL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);

	/* nothing but 0-2 survives execve, whatever a --stdio agent inherited (Linux >= 5.11; best effort) */
	close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);

	if (setsid() < 0)
		child_fail(rfd, 0, errno, "setsid");
	if (r->flags & F_TTY) {
		int s = open(r->slave, O_RDWR);
		if (s < 0)
			child_fail(rfd, 0, errno, "open %s", r->slave);
		if (ioctl(s, TIOCSCTTY, 0) < 0)
			child_fail(rfd, 0, errno, "TIOCSCTTY");
		/* the user owns its terminal, as after a login */
		if (r->switch_user && fchown(s, r->uid, (gid_t)-1) < 0)
			child_fail(rfd, 0, errno, "chown %s", r->slave);
		if (dup2(s, 0) < 0 || dup2(s, 1) < 0 || dup2(s, 2) < 0)
			child_fail(rfd, 0, errno, "dup2");
		if (s > 2)
			close(s);
	} else {
		int in = r->in_r;
		if (in < 0 && (in = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0)
			child_fail(rfd, 0, errno, "open /dev/null");
		if (dup2(in, 0) < 0 || dup2(r->out_w, 1) < 0 || dup2(r->err_w, 2) < 0)
			child_fail(rfd, 0, errno, "dup2");
	}
	/* created with the agent's privileges, before dropping them, and given to the user so that a
	 * `-u 1000 -w /work` command can write in the directory it was put in */
	if ((r->flags & F_MKDIR_CWD) &&
	    mkdir_p(r->cwd, 0755, r->switch_user ? r->uid : (uid_t)-1, r->switch_user ? r->gid : (gid_t)-1) < 0)
		child_fail(rfd, 0, errno, "mkdir %s", r->cwd);
	if (r->switch_user) {
		if (setgroups(1, &r->gid) < 0)
			child_fail(rfd, 0, errno, "setgroups");
		if (setgid(r->gid) < 0)
			child_fail(rfd, 0, errno, "setgid %u", (unsigned)r->gid);
		if (setuid(r->uid) < 0)
			child_fail(rfd, 0, errno, "setuid %u", (unsigned)r->uid);
	}
	if (chdir(r->cwd) < 0)
		child_fail(rfd, 0, errno, "chdir %s", r->cwd);
	child_fail(rfd, 1, exec_path(r->argv, r->envp), "exec %s", r->argv[0]);
}

/* ERROR + EXIT for an exec that could not start. */
static void exec_failed(uint32_t stream, int code, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	send_frame(T_ERROR, stream, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
	send_exit(stream, code, 0);
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void do_exec(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec_req r = { .in_r = -1, .out_w = -1, .err_w = -1 };
	int in_w = -1, out_r = -1, err_r = -1, master = -1, rp[2] = { -1, -1 };
	char home[1024], err[600], *homevar = NULL;
	const char **strs = NULL;
	uid_t uid;
	gid_t gid;

	if (len < 12)
		goto malformed;
	r.flags = get_u32(p);
	uint16_t rows = get_u16(p + 4), cols = get_u16(p + 6);
	size_t argc = get_u16(p + 8), envc = get_u16(p + 10), nstr = 2 + argc + envc, off = 12;
	if (argc < 1)
		goto malformed;
	strs = xrealloc(NULL, nstr * sizeof *strs);
	for (size_t i = 0; i < nstr; i++) {
		const unsigned char *nul = off < len ? memchr(p + off, 0, len - off) : NULL;
		if (!nul)
			goto malformed;
		strs[i] = (const char *)p + off;
		off = (size_t)(nul - p) + 1;
	}
	const char *user = strs[0];
	r.cwd = *strs[1] ? strs[1] : "/";
	r.argv = xrealloc(NULL, (argc + 1) * sizeof *r.argv);
	r.envp = xrealloc(NULL, (envc + 2) * sizeof *r.envp);
	for (size_t i = 0; i < argc; i++)
		r.argv[i] = (char *)strs[2 + i];
	r.argv[argc] = NULL;
	for (size_t i = 0; i < envc; i++)
		r.envp[i] = (char *)strs[2 + argc + i];
	r.envp[envc] = NULL;

	if (resolve_user(user, &uid, &gid, home, sizeof home, err, sizeof err) < 0) {
		exec_failed(stream, 1, "%s", err);
		goto out;
	}
	if (geteuid() == 0) {
		r.switch_user = 1;
	} else if (uid != getuid() || gid != getgid()) {
		/* unprivileged --stdio agent: it can only run things as itself */
		exec_failed(stream, 1, "user \"%s\": %s", user, strerror(EPERM));
		goto out;
	}
	r.uid = uid;
	r.gid = gid;
	if (!env_get(r.envp, "HOME")) {
		homevar = xrealloc(NULL, strlen(home) + 6);
		sprintf(homevar, "HOME=%s", home);
		r.envp[envc] = homevar;
		r.envp[envc + 1] = NULL;
	}

	if (r.flags & F_TTY) {
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || !(r.slave = ptsname(master))) {
			exec_failed(stream, 1, "openpty: %s", strerror(errno));
			goto out;
		}
		if (rows && cols) {
			struct winsize ws = { .ws_row = rows, .ws_col = cols };
			ioctl(master, TIOCSWINSZ, &ws);
		}
		/* a second fd for stdin so reading and writing poll independently */
		if ((in_w = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0 || set_nonblock(master) < 0) {
			exec_failed(stream, 1, "openpty: %s", strerror(errno));
			goto out;
		}
	} else {
		int o[2], e[2], i[2] = { -1, -1 };
		if (pipe2(o, O_CLOEXEC) < 0) {
			exec_failed(stream, 1, "pipe: %s", strerror(errno));
			goto out;
		}
		out_r = o[0], r.out_w = o[1];
		if (pipe2(e, O_CLOEXEC) < 0) {
			exec_failed(stream, 1, "pipe: %s", strerror(errno));
			goto out;
		}
		err_r = e[0], r.err_w = e[1];
		if ((r.flags & F_STDIN) && pipe2(i, O_CLOEXEC) < 0) {
			exec_failed(stream, 1, "pipe: %s", strerror(errno));
			goto out;
		}
		r.in_r = i[0], in_w = i[1];
		set_nonblock(out_r);
		set_nonblock(err_r);
		if (in_w >= 0)
			set_nonblock(in_w);
	}
	if (pipe2(rp, O_CLOEXEC) < 0) {
		exec_failed(stream, 1, "pipe: %s", strerror(errno));
		goto out;
	}

	pid_t pid = fork();
	if (pid < 0) {
		exec_failed(stream, 1, "fork: %s", strerror(errno));
		goto out;
	}
	if (pid == 0) {
		close(rp[0]);
		child_main(&r, rp[1]);
	}
	close_fd(&rp[1]);
	close_fd(&r.in_r);
	close_fd(&r.out_w);
	close_fd(&r.err_w);

	/* The report pipe closes at execve (CLOEXEC): EOF = started. Blocking is fine, it is quick. */
	struct report rep;
	ssize_t n;
	do
		n = read(rp[0], &rep, sizeof rep);
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		/* the failed child is reaped as an orphan by the SIGCHLD handler */
		int code = 1;
		if (rep.at_exec && (rep.err == ENOENT || rep.err == ENOTDIR))
			code = 127;
		else if (rep.at_exec && (rep.err == EACCES || rep.err == ENOEXEC))
			code = 126;
		rep.what[sizeof rep.what - 1] = 0;
		exec_failed(stream, code, "%s: %s", rep.what, strerror(rep.err));
		goto out;
	}

	struct exec *e = xrealloc(NULL, sizeof *e);
	*e = (struct exec){ .stream = stream, .pid = pid, .tty = !!(r.flags & F_TTY), .err_fd = err_r,
			    .in_fd = in_w };
	e->out_fd = e->tty ? master : out_r;
	master = out_r = err_r = in_w = -1;  /* owned by e now */
	vec_add((void ***)&execs, &n_execs, e);
	send_u32(T_STARTED, stream, (uint32_t)pid);
	goto out;

malformed:
	exec_failed(stream, 1, "exec: malformed payload");
out:
	close_fd(&rp[0]);
	close_fd(&rp[1]);
	close_fd(&r.in_r);
	close_fd(&r.out_w);
	close_fd(&r.err_w);
	close_fd(&in_w);
	close_fd(&out_r);
	close_fd(&err_r);
	close_fd(&master);
	free(homevar);
	free(r.argv);
	free(r.envp);
	free(strs);
}

/* One read of process output; closes the fd on EOF/EIO (EIO: PTY slave side closed).
 * Returns bytes forwarded, 0 if nothing right now, -1 if closed. */
static ssize_t pump_output(struct exec *e, int *fd, uint8_t type)
{
	static unsigned char buf[CHUNK];
	size_t room = WINDOW - e->unacked;
	ssize_t n;
	if (room == 0 || e->unacked > WINDOW)
		return 0;
	do
		n = read(*fd, buf, room < sizeof buf ? room : sizeof buf);
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		e->unacked += (uint32_t)n;
		send_frame(type, e->stream, buf, (size_t)n);
		return n;
	}
	if (n < 0 && errno == EAGAIN)
		return 0;
	close_fd(fd);
	return -1;
}

/* Write pending stdin when the pipe/PTY is writable; ACK what went in (or was discarded). */
static void pump_stdin(struct exec *e)
{
	if (e->in_off < e->in_len) {
		ssize_t n = write(e->in_fd, e->in_buf + e->in_off, e->in_len - e->in_off);
		if (n > 0) {
			e->in_off += (size_t)n;
			send_u32(T_STDIN_ACK, e->stream, (uint32_t)n);
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			/* EPIPE (pipe) / EIO (PTY): nobody reads any more */
			send_u32(T_STDIN_ACK, e->stream, (uint32_t)(e->in_len - e->in_off));
			e->in_off = e->in_len;
			e->in_dead = 1;
			close_fd(&e->in_fd);
		}
		if (e->in_off < e->in_len)
			return;
		e->in_off = e->in_len = 0;
	}
	/* everything before the EOF is written: now the EOF itself */
	if (e->in_eof && e->in_fd >= 0) {
		if (!e->tty) {
			close_fd(&e->in_fd);
		} else {
			ssize_t n = write(e->in_fd, "\x04", 1);
			if (n == 1)
				e->in_eof = 0;  /* a TTY stays usable after ^D */
			else if (n < 0 && errno != EAGAIN && errno != EINTR)
				e->in_dead = 1, close_fd(&e->in_fd);
		}
	}
}

static void on_stdin(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec *e = find_exec(stream);
	if (!e)
		return;
	if (len == 0) {
		e->in_eof = 1;
		if (e->in_fd >= 0 && e->in_off == e->in_len)
			pump_stdin(e);  /* nothing pending: no need to wait for the pipe to be writable */
		return;
	}
	if (e->in_dead || e->in_fd < 0 || (!e->tty && e->in_eof)) {
		send_u32(T_STDIN_ACK, stream, len);  /* discarded, still acknowledged */
		return;
	}
	buf_append(&e->in_buf, &e->in_len, &e->in_off, &e->in_cap, p, len);
}

/* The process was reaped: forward what is left in its pipes, within the window, then EXIT, then
 * forget it. Returns 0 while it must wait for the host's ACKs to drain the rest. Non-blocking: a
 * grandchild holding a pipe open (or writing forever) must not delay EXIT past DRAIN_MAX. */
static int finish_exec(struct exec *e)
{
	int *fds[2] = { &e->out_fd, &e->err_fd };
	uint8_t types[2] = { T_STDOUT, T_STDERR };
	for (int i = 0; i < 2; i++) {
		while (*fds[i] >= 0 && !e->idle[i] && e->drained < DRAIN_MAX) {
			if (e->unacked >= WINDOW)
				return 0;
			ssize_t n = pump_output(e, fds[i], types[i]);
			if (n > 0)
				e->drained += (size_t)n;
			else if (n == 0)
				e->idle[i] = 1;
		}
	}
	int status = e->status;
	if (WIFSIGNALED(status))
		send_exit(e->stream, 128 + WTERMSIG(status), WTERMSIG(status));
	else
		send_exit(e->stream, WEXITSTATUS(status), 0);
	close_fd(&e->out_fd);
	close_fd(&e->err_fd);
	close_fd(&e->in_fd);
	vec_del((void **)execs, &n_execs, e);
	free(e->in_buf);
	free(e);
	return 1;
}

/* Finishes every reaped process whose output is drained (or past DRAIN_MAX). */
static void finish_execs(void)
{
	for (size_t i = n_execs; i-- > 0;)
		if (execs[i]->exited)
			finish_exec(execs[i]);
}

/* Reap every child, orphans included (we may be PID 1). */
static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (!WIFEXITED(status) && !WIFSIGNALED(status))
			continue;
		for (size_t i = 0; i < n_execs; i++)
			if (execs[i]->pid == pid && !execs[i]->exited) {
				execs[i]->exited = 1;
				execs[i]->status = status;
				break;
			}
	}
}

/* ---------- files ---------- */

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

static void do_write_file(uint32_t stream, const unsigned char *p, uint32_t len)
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
	if ((word & 0x10000) && lstat(w->path, &st) == 0 && S_ISLNK(st.st_mode) && unlink(w->path) < 0) {
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

static void do_file_data(uint32_t stream, const unsigned char *p, uint32_t len)
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

static void do_read_file(uint32_t stream, const unsigned char *p, uint32_t len)
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

static void pump_read_file(struct rfile *f)
{
	static unsigned char buf[CHUNK];
	size_t room = WINDOW - f->unacked;
	if (f->unacked >= WINDOW)
		return;
	ssize_t n = read(f->fd, buf, room < sizeof buf ? room : sizeof buf);
	if (n > 0) {
		f->unacked += (uint32_t)n;
		send_frame(T_DATA, f->stream, buf, (size_t)n);
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

static struct rfile *find_rfile(uint32_t stream)
{
	for (size_t i = 0; i < n_rfiles; i++)
		if (rfiles[i]->stream == stream)
			return rfiles[i];
	return NULL;
}

static void do_list_dir(uint32_t stream, const unsigned char *p, uint32_t len)
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
			send_frame(T_DATA, stream, buf, used);
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
		send_frame(T_DATA, stream, buf, used);
	if (err) {
		char msg[1024];
		snprintf(msg, sizeof msg, "readdir %s: %s", path, strerror(err));
		send_result(stream, err, msg);
	} else {
		send_result(stream, 0, "");
	}
}

/* ---------- TCP streams (port forwarding) ---------- */

static struct tcp *find_tcp(uint32_t stream)
{
	for (size_t i = 0; i < n_tcps; i++)
		if (tcps[i]->stream == stream)
			return tcps[i];
	return NULL;
}

/* The stream is over: close, TCP_CLOSED (always its last frame), forget. */
static void tcp_end(struct tcp *t, int err)
{
	close(t->fd);
	send_u32(T_TCP_CLOSED, t->stream, (uint32_t)err);
	vec_del((void **)tcps, &n_tcps, t);
	free(t->buf);
	free(t);
}

static void do_tcp_connect(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int one = 1, fd = -1, r = -1;
	if (len == 2 && get_u16(p)) {
		sa.sin_port = htons(get_u16(p));
		fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd >= 0)
			r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	} else {
		errno = EINVAL;
	}
	if (r < 0 && (fd < 0 || errno != EINPROGRESS)) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		send_u32(T_TCP_CLOSED, stream, (uint32_t)err);
		return;
	}
	/* we forward writes as they come: Nagle would only add delayed-ACK stalls */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	struct tcp *t = xrealloc(NULL, sizeof *t);
	*t = (struct tcp){ .stream = stream, .fd = fd, .connecting = r < 0 };
	vec_add((void ***)&tcps, &n_tcps, t);
	if (!t->connecting)
		send_frame(T_TCP_CONNECTED, stream, NULL, 0);
}

static void on_tcp_data(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct tcp *t = find_tcp(stream);
	if (!t)
		return;
	if (len == 0)
		t->host_eof = 1;  /* the poll loop flushes, then shuts down */
	else if (t->wr_done || t->host_eof)
		send_u32(T_STDIN_ACK, stream, len);  /* nowhere to go: discarded, still acknowledged */
	else
		buf_append(&t->buf, &t->len, &t->off, &t->cap, p, len);
}

static short tcp_events(const struct tcp *t)
{
	if (t->connecting)
		return POLLOUT;
	return (!t->rd_eof && t->unacked < WINDOW ? POLLIN : 0) |
	       (t->off < t->len || (t->host_eof && !t->wr_done) ? POLLOUT : 0);
}

/* Write pending bytes and ACK them; a dead peer's bytes are dropped and ACKed too, so the host never
 * waits for a window that cannot open. Then the host's EOF, once everything before it is out. */
static void tcp_write(struct tcp *t)
{
	if (t->off < t->len) {
		ssize_t n = write(t->fd, t->buf + t->off, t->len - t->off);
		if (n > 0) {
			t->off += (size_t)n;
			send_u32(T_STDIN_ACK, t->stream, (uint32_t)n);
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			t->err = t->err ? t->err : errno;
			send_u32(T_STDIN_ACK, t->stream, (uint32_t)(t->len - t->off));
			t->off = t->len;
			t->wr_done = 1;
		}
		if (t->off < t->len)
			return;
		t->off = t->len = 0;
	}
	if (t->host_eof && !t->wr_done) {
		if (shutdown(t->fd, SHUT_WR) < 0 && !t->err)
			t->err = errno;
		t->wr_done = 1;
	}
}

/* One read, never more than the window allows. Returns -1 if the stream ended (t is freed). */
static int tcp_read(struct tcp *t)
{
	static unsigned char buf[CHUNK];
	size_t room = WINDOW - t->unacked;
	ssize_t n = read(t->fd, buf, room < sizeof buf ? room : sizeof buf);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n < 0) {
		tcp_end(t, t->err ? t->err : errno);  /* ECONNRESET...: what was read before went out */
		return -1;
	}
	send_frame(T_TCP_READ, t->stream, buf, (size_t)n);  /* n == 0: the empty TCP_DATA (EOF) */
	t->unacked += (uint32_t)n;
	t->rd_eof = n == 0;
	return 0;
}

static int so_error(int fd)
{
	int err = 0;
	socklen_t l = sizeof err;
	return getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0 ? errno : err;
}

static void tcp_event(struct tcp *t, short rev)
{
	short ev = tcp_events(t);
	if (t->connecting) {
		int err = so_error(t->fd);
		if (err) {
			tcp_end(t, err);
			return;
		}
		t->connecting = 0;
		send_frame(T_TCP_CONNECTED, t->stream, NULL, 0);
		return;  /* reads and writes from the next round */
	}
	/* POLLERR/POLLHUP come whatever we asked: the read or write at hand shows the error */
	if ((ev & POLLOUT) && (rev & (POLLOUT | POLLERR | POLLHUP)))
		tcp_write(t);
	if ((ev & POLLIN) && (rev & (POLLIN | POLLERR | POLLHUP)) && tcp_read(t) < 0)
		return;
	if (!ev && (rev & (POLLERR | POLLHUP))) {
		/* polled only for errors (see serve): nothing to read or write, so ask the socket */
		int err = so_error(t->fd);
		tcp_end(t, err ? err : ECONNRESET);
		return;
	}
	if (t->rd_eof && t->wr_done)
		tcp_end(t, t->err);
}

/* ---------- frames in ---------- */

static void ack(uint32_t *unacked, uint32_t n)
{
	*unacked -= n < *unacked ? n : *unacked;
}

static void handle_frame(uint8_t type, uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec *e;
	struct tcp *t;
	struct rfile *f;
	struct wfile *w;
	switch (type) {
	case T_EXEC:
		do_exec(stream, p, len);
		break;
	case T_STDIN:
		on_stdin(stream, p, len);
		break;
	case T_RESIZE:
		if ((e = find_exec(stream)) && e->tty && e->out_fd >= 0 && len >= 4) {
			struct winsize ws = { .ws_row = get_u16(p), .ws_col = get_u16(p + 2) };
			ioctl(e->out_fd, TIOCSWINSZ, &ws);
		}
		break;
	case T_SIGNAL:
		if ((e = find_exec(stream)) && !e->exited && len >= 4) {  /* reaped: its pid may be reused */
			int sig = (int)get_u32(p);
			if (kill(-e->pid, sig) < 0 && errno == ESRCH)
				kill(e->pid, sig);
		}
		break;
	case T_WRITE_FILE:
		do_write_file(stream, p, len);
		break;
	case T_FILE_DATA:
		do_file_data(stream, p, len);
		break;
	case T_READ_FILE:
		do_read_file(stream, p, len);
		break;
	case T_LIST_DIR:
		do_list_dir(stream, p, len);
		break;
	case T_PING:
		send_frame(T_PONG, stream, p, len);
		break;
	case T_TCP_CONNECT:
		do_tcp_connect(stream, p, len);
		break;
	case T_TCP_DATA:
		on_tcp_data(stream, p, len);
		break;
	case T_CLOSE:
		if ((t = find_tcp(stream))) {
			tcp_end(t, 0);
		} else if ((f = find_rfile(stream))) {
			send_result(stream, ECANCELED, "read cancelled by the host");
			rfile_free(f);
		} else if ((w = find_wfile(stream))) {
			wfile_error(w, "write", w->path ? w->path : "", ECANCELED);
			wfile_finish(w);
		}
		break;
	case T_ACK:
		if (len < 4)
			break;
		if ((t = find_tcp(stream)))
			ack(&t->unacked, get_u32(p));
		else if ((e = find_exec(stream)))
			ack(&e->unacked, get_u32(p));
		else if ((f = find_rfile(stream)))
			ack(&f->unacked, get_u32(p));
		break;
	case T_SHUTDOWN:
		sync();
		if (!is_init) {
			shutdown_children();
			exit(0);
		}
		reboot(RB_POWER_OFF);
		fatal("reboot: %s", strerror(errno));
		break;
	default:
		send_log("unknown frame type 0x%02x (stream %u, %u bytes) ignored", type, stream, len);
	}
}

static unsigned char rbuf[HDR + MAX_PAYLOAD + CHUNK];
static size_t rlen;

static void on_port_readable(void)
{
	ssize_t n = read(port_in, rbuf + rlen, sizeof rbuf - rlen);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		if (!is_init) {
			/* --stdio: the host is gone; nothing may outlive us */
			shutdown_children();
			exit(0);
		}
		port_hup = 1;  /* VM: host not connected (yet/any more) */
		return;
	}
	rlen += (size_t)n;
	size_t off = 0;
	while (rlen - off >= HDR) {
		uint32_t len = get_u32(rbuf + off);
		if (len > MAX_PAYLOAD) {
			/* the host is trusted, so this is a bug; the stream is unrecoverable */
			send_log("protocol error: frame of %u bytes (max %u); input discarded", len, MAX_PAYLOAD);
			rlen = off = 0;
			break;
		}
		if (rlen - off < HDR + len)
			break;
		handle_frame(rbuf[off + 4], get_u32(rbuf + off + 5), rbuf + off + HDR, len);
		off += HDR + len;
	}
	memmove(rbuf, rbuf + off, rlen - off);
	rlen -= off;
}

/* ---------- event loop ---------- */

enum { K_PORT, K_SIG, K_OUT, K_ERR, K_IN, K_RFILE, K_TCP };

static void serve(int sigfd)
{
	struct pollfd *pfd = NULL;
	struct { int kind; void *ptr; } *what = NULL;
	size_t cap = 0;

	send_frame(T_READY, 0, AGENT_VERSION, strlen(AGENT_VERSION));
	for (;;) {
		size_t need = 2 + n_execs * 3 + n_rfiles + n_tcps, n = 0;
		if (need > cap) {
			cap = need * 2;
			pfd = xrealloc(pfd, cap * sizeof *pfd);
			what = xrealloc(what, cap * sizeof *what);
		}
#define ADD(fd_, ev_, kind_, ptr_) \
	(pfd[n] = (struct pollfd){ .fd = (fd_), .events = (ev_) }, what[n].kind = (kind_), what[n++].ptr = (ptr_))
		int timeout = -1;
		if (port_hup)
			timeout = 100;
		else
			ADD(port_in, POLLIN, K_PORT, NULL);
		ADD(sigfd, POLLIN, K_SIG, NULL);
		for (size_t i = 0; i < n_execs; i++) {
			struct exec *e = execs[i];
			/* at the window limit the pipes are not read: the writer in the guest blocks */
			int room = e->unacked < WINDOW && !e->exited;
			if (e->out_fd >= 0 && room)
				ADD(e->out_fd, POLLIN, K_OUT, e);
			if (e->err_fd >= 0 && room)
				ADD(e->err_fd, POLLIN, K_ERR, e);
			if (e->in_fd >= 0 && (e->in_len > e->in_off || e->in_eof))
				ADD(e->in_fd, POLLOUT, K_IN, e);
		}
		for (size_t i = 0; i < n_rfiles; i++)
			if (rfiles[i]->unacked < WINDOW)
				ADD(rfiles[i]->fd, POLLIN, K_RFILE, rfiles[i]);
		for (size_t i = 0; i < n_tcps; i++) {
			/* Nothing wanted: after EOF still polled, for errors (a reset) only; at the window
			 * limit not at all, so that a reset does not lose the data still queued. */
			short ev = tcp_events(tcps[i]);
			if (ev || tcps[i]->rd_eof)
				ADD(tcps[i]->fd, ev, K_TCP, tcps[i]);
		}
#undef ADD
		if (poll(pfd, n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			fatal("poll: %s", strerror(errno));
		}
		port_hup = 0;  /* retry the port after a backoff */

		/* Phase 1: process fds. Nothing here frees an exec, so the pointers stay valid; a TCP stream
		 * may end here, but it has only one entry. */
		for (size_t i = 0; i < n; i++) {
			if (!pfd[i].revents)
				continue;
			struct exec *e = what[i].ptr;
			switch (what[i].kind) {
			case K_OUT:
				if (e->out_fd >= 0)
					pump_output(e, &e->out_fd, T_STDOUT);
				break;
			case K_ERR:
				if (e->err_fd >= 0)
					pump_output(e, &e->err_fd, T_STDERR);
				break;
			case K_IN:
				if (e->in_fd >= 0)
					pump_stdin(e);
				break;
			case K_RFILE:
				pump_read_file(what[i].ptr);
				break;
			case K_TCP:
				tcp_event(what[i].ptr, pfd[i].revents);
				break;
			}
		}
		/* Phase 2: host frames (may add execs, files and TCP streams, may end TCP streams, never
		 * frees an exec). */
		for (size_t i = 0; i < n; i++)
			if (what[i].kind == K_PORT && pfd[i].revents)
				on_port_readable();
		/* Phase 3: reaping marks execs exited; phase 4 frees those whose output is drained. */
		for (size_t i = 0; i < n; i++)
			if (what[i].kind == K_SIG && pfd[i].revents) {
				struct signalfd_siginfo si;
				while (read(sigfd, &si, sizeof si) == sizeof si)
					;
				reap();
			}
		finish_execs();
	}
}

/* ---------- init (PID 1) ---------- */

static char cmd_hostname[256], cmd_time[64], cmd_rootfstype[64] = "ext4";
static char cmd_net[96]; /* matchlock.net=GUEST/PREFIX,GATEWAY,MTU: the host's choice for eth0 */
static int cmd_probe; /* matchlock.probe=1: the host's accelerator test; say so and power off */

static void parse_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	for (char *tok = strtok(buf, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
		if (!strncmp(tok, "matchlock.hostname=", 19))
			snprintf(cmd_hostname, sizeof cmd_hostname, "%s", tok + 19);
		else if (!strncmp(tok, "matchlock.time=", 15))
			snprintf(cmd_time, sizeof cmd_time, "%s", tok + 15);
		else if (!strncmp(tok, "matchlock.rootfstype=", 21))
			snprintf(cmd_rootfstype, sizeof cmd_rootfstype, "%s", tok + 21);
		else if (!strncmp(tok, "matchlock.net=", 14))
			snprintf(cmd_net, sizeof cmd_net, "%s", tok + 14);
		else if (!strcmp(tok, "matchlock.probe=1"))
			cmd_probe = 1;
	}
}

static void xmount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) < 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "move", strerror(errno));
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The host names modules NN-name.ko in dependency order: load them in lexical order. */
static void load_modules(void)
{
	DIR *d = opendir("/lib/modules");
	char **names = NULL;
	size_t n = 0;
	struct dirent *de;
	if (!d)
		return;
	while ((de = readdir(d))) {
		size_t l = strlen(de->d_name);
		if (l > 3 && !strcmp(de->d_name + l - 3, ".ko"))
			vec_add((void ***)&names, &n, xstrdup(de->d_name));
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof *names, cmp_str);
	for (size_t i = 0; i < n; i++) {
		char path[512];
		snprintf(path, sizeof path, "/lib/modules/%s", names[i]);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			console("load %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		unlink(path);  /* the initramfs stays in RAM: free what is no longer needed */
		free(names[i]);
	}
	free(names);
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void wait_for(const char *path, int ms)
{
	for (long long end = now_ms() + ms; access(path, F_OK) < 0; usleep(5000))
		if (now_ms() >= end)
			fatal("%s did not appear within %d ms", path, ms);
}

static int set_addr(int s, unsigned long req, const char *ifname, in_addr_t a)
{
	struct ifreq ifr = { 0 };
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = a;
	return ioctl(s, req, &ifr);
}

/*
 * eth0 as the host chose it (the kernel has no ip= autoconfig): IPv6 off, MTU, address, link up,
 * default route. Failures are logged, not fatal: the VM stays usable without its network.
 */
static void configure_eth0(void)
{
	char ip[32] = "", gw[32] = "";
	int prefix = 0, mtu = 0;
	if (!*cmd_net)
		return;
	if (sscanf(cmd_net, "%31[0-9.]/%d,%31[0-9.],%d", ip, &prefix, gw, &mtu) != 4 || prefix < 1 || prefix > 32) {
		console("matchlock.net=%s: not GUEST/PREFIX,GATEWAY,MTU", cmd_net);
		return;
	}
	for (long long end = now_ms() + 5000; access("/sys/class/net/eth0", F_OK) < 0; usleep(5000))
		if (now_ms() >= end) {
			console("eth0 did not appear within 5 s");
			return;
		}
	int fd = open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "1\n", 2) != 2)
		console("disable IPv6 on eth0: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
	ifr.ifr_mtu = mtu;
	in_addr_t addr = inet_addr(ip), gwa = inet_addr(gw), mask = htonl(~0u << (32 - prefix));
	if (s < 0 || ioctl(s, SIOCSIFMTU, &ifr) < 0 || set_addr(s, SIOCSIFADDR, "eth0", addr) < 0 ||
	    set_addr(s, SIOCSIFNETMASK, "eth0", mask) < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(s, SIOCSIFFLAGS, &ifr) < 0)) {
		console("configure eth0: %s", strerror(errno));
	} else {
		struct rtentry rt = { 0 };
		struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst, *g = (struct sockaddr_in *)&rt.rt_gateway,
				   *m = (struct sockaddr_in *)&rt.rt_genmask;
		dst->sin_family = g->sin_family = m->sin_family = AF_INET;
		g->sin_addr.s_addr = gwa;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = "eth0";
		if (ioctl(s, SIOCADDRT, &rt) < 0)
			console("default route via %s: %s", gw, strerror(errno));
	}
	if (s >= 0)
		close(s);
}

static void set_console(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

static void init_system(void)
{
	/* with fds 0-2 closed (no /dev/console in the initramfs) nothing may open a file before this */
	mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY) {
		set_console();
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	}
	set_console();
	xmount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	xmount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	parse_cmdline();
	if (cmd_probe) {
		dprintf(1, "MATCHLOCK-PROBE-OK\n");
		reboot(RB_POWER_OFF);
	}
	load_modules();

	/* the root: overlay of the read-only base disk and a writable upper */
	wait_for("/dev/vda", 10000);
	mkdir("/mnt", 0755);
	xmount("/dev/vda", "/mnt/lower", cmd_rootfstype, MS_RDONLY,
	       strcmp(cmd_rootfstype, "ext4") ? NULL : "noload"); /* no journal replay on a shared image */
	if (access("/dev/vdb", F_OK) == 0)
		xmount("/dev/vdb", "/mnt/upperdisk", "ext4", 0, NULL);
	else
		xmount("tmpfs", "/mnt/upperdisk", "tmpfs", 0, "mode=0755");
	if ((mkdir("/mnt/upperdisk/upper", 0755) < 0 && errno != EEXIST) ||
	    (mkdir("/mnt/upperdisk/work", 0755) < 0 && errno != EEXIST))
		fatal("mkdir upper/work: %s", strerror(errno));
	xmount("overlay", "/mnt/root", "overlay", 0,
	       "lowerdir=/mnt/lower,upperdir=/mnt/upperdisk/upper,workdir=/mnt/upperdisk/work");

	/* switch root (the overlay is writable, so the mkdirs inside work) */
	xmount("/proc", "/mnt/root/proc", NULL, MS_MOVE, NULL);
	xmount("/sys", "/mnt/root/sys", NULL, MS_MOVE, NULL);
	xmount("/dev", "/mnt/root/dev", NULL, MS_MOVE, NULL);
	if (chdir("/mnt/root") < 0)
		fatal("chdir /mnt/root: %s", strerror(errno));
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
		fatal("move root: %s", strerror(errno));
	if (chroot(".") < 0 || chdir("/") < 0)
		fatal("chroot: %s", strerror(errno));

	/* not fatal from here: a missing feature shows up as an exec error, the VM stays usable */
	mkdir("/dev/pts", 0755);
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5") < 0)
		console("mount devpts: %s", strerror(errno));
	char link[64];
	ssize_t ll = readlink("/dev/ptmx", link, sizeof link - 1);
	if (ll < 0 || (link[ll] = 0, strcmp(link, "pts/ptmx") && strcmp(link, "/dev/pts/ptmx"))) {
		/* devtmpfs's /dev/ptmx may point at another devpts instance: make it ours */
		if (mount("/dev/pts/ptmx", "/dev/ptmx", NULL, MS_BIND, NULL) < 0)
			console("bind /dev/pts/ptmx: %s", strerror(errno));
	}
	mkdir("/dev/shm", 01777);
	if (mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
		console("mount /dev/shm: %s", strerror(errno));
	if (symlink("/proc/self/fd", "/dev/fd") < 0 && errno != EEXIST)
		console("symlink /dev/fd: %s", strerror(errno));
	const char *std[3] = { "/dev/stdin", "/dev/stdout", "/dev/stderr" };
	for (int i = 0; i < 3; i++) {
		char target[32];
		snprintf(target, sizeof target, "/proc/self/fd/%d", i);
		if (symlink(target, std[i]) < 0 && errno != EEXIST)
			console("symlink %s: %s", std[i], strerror(errno));
	}

	/* loopback; the kernel assigns 127.0.0.1 and ::1 when lo goes up */
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(s, SIOCSIFFLAGS, &ifr) < 0))
		console("bring up lo: %s", strerror(errno));
	if (s >= 0)
		close(s);

	configure_eth0();

	if (*cmd_hostname && sethostname(cmd_hostname, strlen(cmd_hostname)) < 0)
		console("sethostname: %s", strerror(errno));
	if (*cmd_time) {
		/* SECONDS, optionally with a decimal fraction */
		char *end;
		struct timespec ts = { .tv_sec = strtoll(cmd_time, &end, 10) };
		if (*end == '.') {
			long scale = 100000000;
			for (char *c = end + 1; *c >= '0' && *c <= '9' && scale; c++, scale /= 10)
				ts.tv_nsec += (*c - '0') * scale;
		}
		if (clock_settime(CLOCK_REALTIME, &ts) < 0)
			console("clock_settime: %s", strerror(errno));
	}
}

/* The virtio-serial port named "agent"; ports are announced asynchronously, so wait for it. */
static int open_port(void)
{
	for (long long end = now_ms() + 10000; now_ms() < end; usleep(5000)) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		while (d && (de = readdir(d))) {
			char path[512], name[64] = "";
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			ssize_t n = fd < 0 ? -1 : read(fd, name, sizeof name - 1);
			if (fd >= 0)
				close(fd);
			if (n <= 0)
				continue;
			name[n] = 0;
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, "agent"))
				continue;
			snprintf(path, sizeof path, "/dev/%s", de->d_name);
			int port = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
			if (port >= 0) {
				closedir(d);
				return port;
			}
		}
		if (d)
			closedir(d);
	}
	fatal("virtio-serial port \"agent\" not found");
	return -1;
}

int main(int argc, char **argv)
{
	sigset_t chld;
	is_init = getpid() == 1;
	if (!is_init && (argc < 2 || strcmp(argv[1], "--stdio"))) {
		fprintf(stderr, "usage: %s --stdio   (as PID 1 it serves the virtio port \"agent\")\n", argv[0]);
		return 2;
	}

	/* SIGCHLD through a signalfd; SIGPIPE ignored so dead readers give EPIPE. Undone in children. */
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	umask(022);  /* deterministic for both modes; WRITE_FILE sets exact modes itself */

	if (is_init) {
		init_system();
		port_in = port_out = open_port();
	} else {
		/* make sure fds 0-2 exist so no pipe lands on them */
		int fd;
		while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
			;
		if (fd > 2)
			close(fd);
		port_in = 0;
		port_out = 1;
		/* orphans of our processes come to us, as they would to PID 1 */
		prctl(PR_SET_CHILD_SUBREAPER, 1);
	}

	int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0)
		fatal("signalfd: %s", strerror(errno));
	serve(sigfd);
	return 0;
}
