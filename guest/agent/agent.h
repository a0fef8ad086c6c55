/*
 * matchlock guest agent: what its files share.
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
 * One file per concern:
 *   main.c    the poll loop, the frame dispatch, main()
 *   frames.c  frames out (send_*) and in (reading and splitting the port's bytes)
 *   exec.c    EXEC: processes, their stdin/stdout/stderr, signals, reaping
 *   users.c   the `user` of an EXEC, from /etc/passwd and /etc/group
 *   files.c   WRITE_FILE, READ_FILE, LIST_DIR
 *   tcp.c     TCP streams (port forwarding)
 *   init.c    PID 1: mounts, modules, network, clock; finding the ports
 *   vfs.c     host folders: mounts FUSE and relays its raw messages over the port "vfs"
 *   util.c    memory, fds, logging
 * protocol.h (frame types and constants) is generated from src/guest/protocol-spec.ts.
 *
 * Build: cc -static -Os -s -Wall -Wextra -o matchlock-agent *.c
 */
#ifndef MATCHLOCK_AGENT_H
#define MATCHLOCK_AGENT_H

#define _GNU_SOURCE
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "protocol.h"

/* Every guest->host byte stream (process output, READ_FILE content, TCP data) is credit-based: we
 * send at most WINDOW bytes the host has not ACKed, and stop reading the source at the limit, so a
 * slow reader on the host stalls the writer in the guest instead of filling anyone's memory. */

/* argv[0] without a '/' is searched in the PATH of the exec's environment, or in this */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* ---------- main.c ---------- */

extern int is_init;   /* PID 1 in a VM (else --stdio) */
extern int port_in, port_out;
extern int port_hup;  /* VM: host side not connected; back off instead of spinning */

void handle_frame(uint8_t type, uint32_t stream, const unsigned char *p, uint32_t len);

/* ---------- util.c ---------- */

static inline void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static inline void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static inline uint16_t get_u16(const unsigned char *p) { return p[0] | p[1] << 8; }
static inline uint32_t get_u32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
void console(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
int write_all(int fd, const void *buf, size_t n);
int mkdir_p(const char *path, mode_t mode, uid_t uid, gid_t gid);
void vec_add(void ***v, size_t *n, void *p);
void vec_del(void **v, size_t *n, void *p);
void buf_append(unsigned char **buf, size_t *len, size_t *off, size_t *cap, const void *p, size_t n);
void close_fd(int *fd);
int set_nonblock(int fd);

/* ---------- frames.c ---------- */

void send_frame(uint8_t type, uint32_t stream, const void *p, size_t len);
void send_u32(uint8_t type, uint32_t stream, uint32_t v);
void send_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void send_exit(uint32_t stream, int32_t code, int32_t sig);
void send_result(uint32_t stream, int err, const char *msg);
void on_port_readable(void);

/* ---------- users.c ---------- */

int resolve_user(const char *spec, uid_t *uid, gid_t *gid, char *home, size_t homesz, char *err, size_t errsz);

/* ---------- exec.c ---------- */

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

extern struct exec **execs;
extern size_t n_execs;

struct exec *find_exec(uint32_t stream);
void do_exec(uint32_t stream, const unsigned char *p, uint32_t len);
void on_stdin(uint32_t stream, const unsigned char *p, uint32_t len);
void on_resize(uint32_t stream, const unsigned char *p, uint32_t len);
void on_signal(uint32_t stream, const unsigned char *p, uint32_t len);
ssize_t pump_output(struct exec *e, int *fd, uint8_t type);
void pump_stdin(struct exec *e);
void finish_execs(void);
void reap(void);
void shutdown_children(void);

/* ---------- files.c ---------- */

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

extern struct rfile **rfiles;
extern size_t n_rfiles;

void do_write_file(uint32_t stream, const unsigned char *p, uint32_t len);
void do_file_data(uint32_t stream, const unsigned char *p, uint32_t len);
void do_read_file(uint32_t stream, const unsigned char *p, uint32_t len);
void do_list_dir(uint32_t stream, const unsigned char *p, uint32_t len);
void pump_read_file(struct rfile *f);
struct rfile *find_rfile(uint32_t stream);
/* CLOSE of a READ_FILE or WRITE_FILE: RESULT ECANCELED. Returns 0 if the stream is neither. */
int close_file(uint32_t stream);

/* ---------- tcp.c ---------- */

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
	uint32_t unacked;    /* guest->host bytes sent and not yet ACKed; we read only below WINDOW */
	int err;             /* first socket error, for TCP_CLOSED */
};

extern struct tcp **tcps;
extern size_t n_tcps;

struct tcp *find_tcp(uint32_t stream);
void do_tcp_connect(uint32_t stream, const unsigned char *p, uint32_t len);
void on_tcp_data(uint32_t stream, const unsigned char *p, uint32_t len);
void tcp_end(struct tcp *t, int err);
short tcp_events(const struct tcp *t);
void tcp_event(struct tcp *t, short rev);

/* ---------- init.c ---------- */

void init_system(void);
void do_set_identity(uint32_t stream, const unsigned char *p, uint32_t len);
int open_port(const char *name);

/* ---------- vfs.c ---------- */

void start_vfs(const char *path, int port);

#endif
