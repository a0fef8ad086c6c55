/* matchlock guest agent: frames out (send_*) and in (the port's bytes split into frames). */
#include "agent.h"  /* first: it defines _GNU_SOURCE */

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------- frames out ---------- */

static unsigned char obuf[HEADER_SIZE + MAX_PAYLOAD];

static void send2(uint8_t type, uint32_t stream, const void *a, size_t alen, const void *b, size_t blen)
{
	size_t len = alen + blen;
	if (len > MAX_PAYLOAD)
		len = MAX_PAYLOAD, blen = len - alen; /* callers stay far below; never break framing */
	put_u32(obuf, (uint32_t)len);
	obuf[4] = type;
	put_u32(obuf + 5, stream);
	if (alen)
		memcpy(obuf + HEADER_SIZE, a, alen);
	if (blen)
		memcpy(obuf + HEADER_SIZE + alen, b, blen);
	if (write_all(port_out, obuf, HEADER_SIZE + len) < 0) {
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

void send_frame(uint8_t type, uint32_t stream, const void *p, size_t len)
{
	send2(type, stream, p, len, NULL, 0);
}

void send_u32(uint8_t type, uint32_t stream, uint32_t v)
{
	unsigned char b[4];
	put_u32(b, v);
	send_frame(type, stream, b, 4);
}

void send_log(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	send_frame(G_LOG, 0, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

void send_exit(uint32_t stream, int32_t code, int32_t sig)
{
	unsigned char b[8];
	put_u32(b, (uint32_t)code);
	put_u32(b + 4, (uint32_t)sig);
	send_frame(G_EXIT, stream, b, 8);
}

void send_result(uint32_t stream, int err, const char *msg)
{
	unsigned char b[4];
	put_u32(b, (uint32_t)err);
	send2(G_RESULT, stream, b, 4, msg, strlen(msg));
}

/* ---------- frames in ---------- */

static unsigned char rbuf[HEADER_SIZE + MAX_PAYLOAD + CHUNK];
static size_t rlen;

void on_port_readable(void)
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
	while (rlen - off >= HEADER_SIZE) {
		uint32_t len = get_u32(rbuf + off);
		if (len > MAX_PAYLOAD) {
			/* the host is trusted, so this is a bug; the stream is unrecoverable */
			send_log("protocol error: frame of %u bytes (max %u); input discarded", len, MAX_PAYLOAD);
			rlen = off = 0;
			break;
		}
		if (rlen - off < HEADER_SIZE + len)
			break;
		handle_frame(rbuf[off + 4], get_u32(rbuf + off + 5), rbuf + off + HEADER_SIZE, len);
		off += HEADER_SIZE + len;
	}
	memmove(rbuf, rbuf + off, rlen - off);
	rlen -= off;
}
