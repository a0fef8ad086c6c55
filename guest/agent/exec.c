/* matchlock guest agent: EXEC (processes, their stdin/stdout/stderr, signals, reaping). */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

struct exec **execs;
size_t n_execs;

struct exec *find_exec(uint32_t stream)
{
	for (size_t i = 0; i < n_execs; i++)
		if (execs[i]->stream == stream)
			return execs[i];
	return NULL;
}

/* --stdio: on EOF/SHUTDOWN nothing may outlive the agent. */
void shutdown_children(void)
{
	for (size_t i = 0; i < n_execs; i++)
		if (kill(-execs[i]->pid, SIGKILL) < 0)
			kill(execs[i]->pid, SIGKILL);
}

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
	if (r->flags & EXEC_TTY) {
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
	if ((r->flags & EXEC_MKDIR_CWD) &&
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
	send_frame(G_ERROR, stream, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
	send_exit(stream, code, 0);
}

void do_exec(uint32_t stream, const unsigned char *p, uint32_t len)
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

	if (r.flags & EXEC_TTY) {
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
		if ((r.flags & EXEC_STDIN) && pipe2(i, O_CLOEXEC) < 0) {
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
	*e = (struct exec){ .stream = stream, .pid = pid, .tty = !!(r.flags & EXEC_TTY), .err_fd = err_r,
			    .in_fd = in_w };
	e->out_fd = e->tty ? master : out_r;
	master = out_r = err_r = in_w = -1;  /* owned by e now */
	vec_add((void ***)&execs, &n_execs, e);
	send_u32(G_STARTED, stream, (uint32_t)pid);
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
ssize_t pump_output(struct exec *e, int *fd, uint8_t type)
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
void pump_stdin(struct exec *e)
{
	if (e->in_off < e->in_len) {
		ssize_t n = write(e->in_fd, e->in_buf + e->in_off, e->in_len - e->in_off);
		if (n > 0) {
			e->in_off += (size_t)n;
			send_u32(G_STDIN_ACK, e->stream, (uint32_t)n);
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			/* EPIPE (pipe) / EIO (PTY): nobody reads any more */
			send_u32(G_STDIN_ACK, e->stream, (uint32_t)(e->in_len - e->in_off));
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

void on_stdin(uint32_t stream, const unsigned char *p, uint32_t len)
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
		send_u32(G_STDIN_ACK, stream, len);  /* discarded, still acknowledged */
		return;
	}
	buf_append(&e->in_buf, &e->in_len, &e->in_off, &e->in_cap, p, len);
}

/* TIOCSWINSZ on the PTY of a TTY exec; ignored otherwise. */
void on_resize(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec *e = find_exec(stream);
	if (e && e->tty && e->out_fd >= 0 && len >= 4) {
		struct winsize ws = { .ws_row = get_u16(p), .ws_col = get_u16(p + 2) };
		ioctl(e->out_fd, TIOCSWINSZ, &ws);
	}
}

/* kill(-pgid, signo); not once reaped: its pid may be reused. */
void on_signal(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec *e = find_exec(stream);
	if (e && !e->exited && len >= 4) {
		int sig = (int)get_u32(p);
		if (kill(-e->pid, sig) < 0 && errno == ESRCH)
			kill(e->pid, sig);
	}
}

/* The process was reaped: forward what is left in its pipes, within the window, then EXIT, then
 * forget it. Returns 0 while it must wait for the host's ACKs to drain the rest. Non-blocking: a
 * grandchild holding a pipe open (or writing forever) must not delay EXIT past DRAIN_MAX. */
static int finish_exec(struct exec *e)
{
	int *fds[2] = { &e->out_fd, &e->err_fd };
	uint8_t types[2] = { G_STDOUT, G_STDERR };
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
void finish_execs(void)
{
	for (size_t i = n_execs; i-- > 0;)
		if (execs[i]->exited)
			finish_exec(execs[i]);
}

/* Reap every child, orphans included (we may be PID 1). */
void reap(void)
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
