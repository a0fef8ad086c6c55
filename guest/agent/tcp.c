/* matchlock guest agent: TCP streams (port forwarding to 127.0.0.1 in the guest). */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct tcp **tcps;
size_t n_tcps;

struct tcp *find_tcp(uint32_t stream)
{
	for (size_t i = 0; i < n_tcps; i++)
		if (tcps[i]->stream == stream)
			return tcps[i];
	return NULL;
}

/* The stream is over: close, TCP_CLOSED (always its last frame), forget. */
void tcp_end(struct tcp *t, int err)
{
	close(t->fd);
	send_u32(G_TCP_CLOSED, t->stream, (uint32_t)err);
	vec_del((void **)tcps, &n_tcps, t);
	free(t->buf);
	free(t);
}

void do_tcp_connect(uint32_t stream, const unsigned char *p, uint32_t len)
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
		send_u32(G_TCP_CLOSED, stream, (uint32_t)err);
		return;
	}
	/* we forward writes as they come: Nagle would only add delayed-ACK stalls */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	struct tcp *t = xrealloc(NULL, sizeof *t);
	*t = (struct tcp){ .stream = stream, .fd = fd, .connecting = r < 0 };
	vec_add((void ***)&tcps, &n_tcps, t);
	if (!t->connecting)
		send_frame(G_TCP_CONNECTED, stream, NULL, 0);
}

void on_tcp_data(uint32_t stream, const unsigned char *p, uint32_t len)
{
	struct tcp *t = find_tcp(stream);
	if (!t)
		return;
	if (len == 0)
		t->host_eof = 1;  /* the poll loop flushes, then shuts down */
	else if (t->wr_done || t->host_eof)
		send_u32(G_STDIN_ACK, stream, len);  /* nowhere to go: discarded, still acknowledged */
	else
		buf_append(&t->buf, &t->len, &t->off, &t->cap, p, len);
}

short tcp_events(const struct tcp *t)
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
			send_u32(G_STDIN_ACK, t->stream, (uint32_t)n);
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			t->err = t->err ? t->err : errno;
			send_u32(G_STDIN_ACK, t->stream, (uint32_t)(t->len - t->off));
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
	send_frame(G_TCP_DATA, t->stream, buf, (size_t)n);  /* n == 0: the empty TCP_DATA (EOF) */
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

void tcp_event(struct tcp *t, short rev)
{
	short ev = tcp_events(t);
	if (t->connecting) {
		int err = so_error(t->fd);
		if (err) {
			tcp_end(t, err);
			return;
		}
		t->connecting = 0;
		send_frame(G_TCP_CONNECTED, t->stream, NULL, 0);
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
