/* matchlock guest agent: the poll loop, the frame dispatch, main(). What the agent is: see agent.h. */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

int is_init;
int port_in = -1, port_out = -1;
int port_hup;

/* ---------- frames in ---------- */

static void ack(uint32_t *unacked, uint32_t n)
{
	*unacked -= n < *unacked ? n : *unacked;
}

void handle_frame(uint8_t type, uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct exec *e;
	struct tcp *t;
	struct rfile *f;
	switch (type) {
	case H_EXEC:
		do_exec(stream, p, len);
		break;
	case H_STDIN:
		on_stdin(stream, p, len);
		break;
	case H_RESIZE:
		on_resize(stream, p, len);
		break;
	case H_SIGNAL:
		on_signal(stream, p, len);
		break;
	case H_WRITE_FILE:
		do_write_file(stream, p, len);
		break;
	case H_FILE_DATA:
		do_file_data(stream, p, len);
		break;
	case H_READ_FILE:
		do_read_file(stream, p, len);
		break;
	case H_LIST_DIR:
		do_list_dir(stream, p, len);
		break;
	case H_PING:
		send_frame(G_PONG, stream, p, len);
		break;
	case H_TCP_CONNECT:
		do_tcp_connect(stream, p, len);
		break;
	case H_TCP_DATA:
		on_tcp_data(stream, p, len);
		break;
	case H_CLOSE:
		if ((t = find_tcp(stream)))
			tcp_end(t, 0);
		else
			close_file(stream);
		break;
	case H_ACK:
		if (len < 4)
			break;
		if ((t = find_tcp(stream)))
			ack(&t->unacked, get_u32(p));
		else if ((e = find_exec(stream)))
			ack(&e->unacked, get_u32(p));
		else if ((f = find_rfile(stream)))
			ack(&f->unacked, get_u32(p));
		break;
	case H_SET_IDENTITY:
		if (is_init)
			do_set_identity(stream, p, len);
		else
			send_result(stream, EPERM, "SET_IDENTITY: not PID 1 in a VM");
		break;
	case H_SHUTDOWN:
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

/* ---------- event loop ---------- */

enum { K_PORT, K_SIG, K_OUT, K_ERR, K_IN, K_RFILE, K_TCP };

static void serve(int sigfd)
{
	struct pollfd *pfd = NULL;
	struct { int kind; void *ptr; } *what = NULL;
	size_t cap = 0;

	send_frame(G_READY, 0, AGENT_VERSION, strlen(AGENT_VERSION));
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
					pump_output(e, &e->out_fd, G_STDOUT);
				break;
			case K_ERR:
				if (e->err_fd >= 0)
					pump_output(e, &e->err_fd, G_STDERR);
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
		port_in = port_out = open_port("agent");
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
