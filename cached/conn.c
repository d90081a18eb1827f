/* skv-cached: sending to a peer (clients, engines, admin tools). A message the socket has no
 * room for waits in the connection's output queue, in order, with its own copies of its fds,
 * until the socket polls writable (EPOLLOUT is asked for only while the queue holds
 * something); a peer that leaves more than CACHED_OUT_MAX_BYTES unread is dropped. Split out
 * of daemon.c, whose event loop calls cached_conn_flush. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "daemon-pvt.h"
#include "proto.h"
#include "wake.h"

/* Poll the connection for room (EPOLLOUT) only while its output queue holds something. */
static void conn_want_out(struct cached *d, struct cached_conn *c, int on)
{
	struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u),
				  .data.fd = c->fd };
	epoll_ctl(d->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

void cached_conn_free_out(struct cached_conn *c)
{
	for (struct cached_outmsg *m = c->out_head, *next; m; m = next) {
		next = m->next;
		for (int i = 0; i < m->n_fds; i++)
			close(m->fds[i]);
		free(m);
	}
	c->out_head = c->out_tail = NULL;
	c->out_bytes = 0;
}

/* A message the socket has no room for: keep it, with our own copies of its fds (the caller
 * closes its own). A burst (a thousand DROPs when a client dies, a thousand FAILEDs when an
 * engine does) is larger than a socket buffer, and none of it may be lost. */
static int conn_enqueue(struct cached *d, struct cached_conn *c, uint16_t type, uint32_t seq,
			const void *body, const int *fds, int n_fds)
{
	size_t len = skv_msg_body_size(type);
	if (c->out_bytes + len > CACHED_OUT_MAX_BYTES) {
		c->overflow = 1;
		d->overflowed = 1;
		return -ENOBUFS;
	}
	struct cached_outmsg *m = malloc(sizeof(*m) + len);
	if (!m) {
		/* A lost reply would leave the peer waiting: hang up on it instead. */
		c->overflow = 1;
		d->overflowed = 1;
		return -ENOMEM;
	}
	m->next = NULL;
	m->type = type;
	m->seq = seq;
	m->len = len;
	m->n_fds = 0;
	memcpy(m->body, body, len);
	for (int i = 0; i < n_fds; i++) {
		int fd = fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
		if (fd < 0) {
			int err = -errno;
			for (int k = 0; k < m->n_fds; k++)
				close(m->fds[k]);
			free(m);
			c->overflow = 1;
			d->overflowed = 1;
			return err;
		}
		m->fds[m->n_fds++] = fd;
	}
	if (c->out_tail)
		c->out_tail->next = m;
	else
		c->out_head = m;
	c->out_tail = m;
	if (c->out_head == m)
		conn_want_out(d, c, 1);
	c->out_bytes += len;
	return 0;
}

int cached_conn_send(struct cached *d, struct cached_conn *c, uint16_t type, const void *body,
		     const int *fds, int n_fds)
{
	if (c->fd < 0 || c->overflow)
		return -EPIPE;
	uint32_t seq = c->seq_out++;
	/* Behind queued messages, a message waits its turn: order is part of the protocol. */
	if (c->out_head)
		return conn_enqueue(d, c, type, seq, body, fds, n_fds);
	int err = skv_msg_send(c->fd, type, seq, body, fds, n_fds);
	if (err == -EAGAIN || err == -EWOULDBLOCK)
		return conn_enqueue(d, c, type, seq, body, fds, n_fds);
	/* An engine sleeping in a futex does not see its socket: ring its doorbell too. */
	if (!err && c->engine)
		skv_wake(c->engine->doorbell, c->engine->efd);
	return err;
}

/* The socket polls writable: send what waits, in order. */
void cached_conn_flush(struct cached *d, struct cached_conn *c)
{
	int sent = 0;
	while (c->fd >= 0 && c->out_head) {
		struct cached_outmsg *m = c->out_head;
		int err = skv_msg_send(c->fd, m->type, m->seq, m->body, m->fds, m->n_fds);
		if (err == -EAGAIN || err == -EWOULDBLOCK)
			break;
		if (err < 0) {
			cached_drop_conn(d, c);
			return;
		}
		for (int i = 0; i < m->n_fds; i++)
			close(m->fds[i]);
		c->out_head = m->next;
		if (!c->out_head)
			c->out_tail = NULL;
		c->out_bytes -= m->len;
		free(m);
		sent = 1;
	}
	if (c->fd >= 0 && !c->out_head)
		conn_want_out(d, c, 0);
	if (sent && c->engine)
		skv_wake(c->engine->doorbell, c->engine->efd);
}

void cached_conn_errorf(struct cached *d, struct cached_conn *c, int code, const char *fmt, ...)
{
	struct skv_msg_error e = { .code = code };
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(e.text, sizeof(e.text), fmt, ap);
	va_end(ap);
	cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
}

void cached_conn_error(struct cached *d, struct cached_conn *c, int code, const char *text)
{
	cached_conn_errorf(d, c, code, "%s", text);
}
