#include "proto.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "skv-error.h"

static const struct {
	const char *name;
	size_t body;
} proto_types[SKV_MSG_TYPE_END] = {
	[SKV_MSG_HELLO] = { "HELLO", sizeof(struct skv_msg_hello) },
	[SKV_MSG_HELLO_OK] = { "HELLO_OK", sizeof(struct skv_msg_hello_ok) },
	[SKV_MSG_ERROR] = { "ERROR", sizeof(struct skv_msg_error) },
	[SKV_MSG_OPEN] = { "OPEN", sizeof(struct skv_msg_open) },
	[SKV_MSG_OPENED] = { "OPENED", sizeof(struct skv_msg_opened) },
	[SKV_MSG_CLOSE] = { "CLOSE", sizeof(struct skv_msg_stream) },
	[SKV_MSG_CLOSED] = { "CLOSED", sizeof(struct skv_msg_stream) },
	[SKV_MSG_FAILED] = { "FAILED", sizeof(struct skv_msg_failed) },
	[SKV_MSG_ASSIGN] = { "ASSIGN", sizeof(struct skv_msg_assign) },
	[SKV_MSG_DROP] = { "DROP", sizeof(struct skv_msg_stream) },
	[SKV_MSG_DROPPED] = { "DROPPED", sizeof(struct skv_msg_stream) },
	[SKV_MSG_STREAM_ERROR] = { "STREAM_ERROR", sizeof(struct skv_msg_failed) },
	[SKV_MSG_STATS_REQ] = { "STATS_REQ", sizeof(struct skv_msg_stream) },
	[SKV_MSG_STATS] = { "STATS", sizeof(struct skv_msg_stats) },
	[SKV_MSG_ADMIN_REQ] = { "ADMIN_REQ", sizeof(struct skv_msg_admin_req) },
	[SKV_MSG_ADMIN_SERVER] = { "ADMIN_SERVER", sizeof(struct skv_admin_server) },
	[SKV_MSG_ADMIN_STREAM] = { "ADMIN_STREAM", sizeof(struct skv_admin_stream) },
	[SKV_MSG_ADMIN_ARENA] = { "ADMIN_ARENA", sizeof(struct skv_admin_arena) },
	[SKV_MSG_ADMIN_ENGINE] = { "ADMIN_ENGINE", sizeof(struct skv_admin_engine) },
	[SKV_MSG_ADMIN_TOKENS] = { "ADMIN_TOKENS", sizeof(struct skv_admin_tokens) },
	[SKV_MSG_ADMIN_END] = { "ADMIN_END", sizeof(struct skv_admin_end) },
	[SKV_MSG_ADMIN_EVENT] = { "ADMIN_EVENT", sizeof(struct skv_admin_event) },
	[SKV_MSG_ADMIN_HIST] = { "ADMIN_HIST", sizeof(struct skv_admin_hist) },
	[SKV_MSG_QUEUED] = { "QUEUED", sizeof(struct skv_msg_queued) },
	[SKV_MSG_OPEN_NAMED] = { "OPEN_NAMED", sizeof(struct skv_msg_open_named) },
	[SKV_MSG_OPENED_NAMED] = { "OPENED_NAMED", sizeof(struct skv_msg_opened_named) },
	[SKV_MSG_ATTACH] = { "ATTACH", sizeof(struct skv_msg_attach) },
	[SKV_MSG_DETACH] = { "DETACH", sizeof(struct skv_msg_stream) },
	[SKV_MSG_DETACHED] = { "DETACHED", sizeof(struct skv_msg_stream) },
	[SKV_MSG_REATTACH] = { "REATTACH", sizeof(struct skv_msg_stream) },
	[SKV_MSG_SNAPSHOT] = { "SNAPSHOT", sizeof(struct skv_msg_snapshot) },
	[SKV_MSG_SNAPSHOTTED] = { "SNAPSHOTTED", sizeof(struct skv_msg_snapshotted) },
	[SKV_MSG_ASSIGN_RESTORED] = { "ASSIGN_RESTORED", sizeof(struct skv_msg_assign_restored) },
	[SKV_MSG_ADMIN_SNAPSHOT] = { "ADMIN_SNAPSHOT", sizeof(struct skv_msg_admin_req) },
	[SKV_MSG_ADMIN_RESTORE] = { "ADMIN_RESTORE", sizeof(struct skv_msg_admin_req) },
	[SKV_MSG_ADMIN_RESULT] = { "ADMIN_RESULT", sizeof(struct skv_admin_result) },
	[SKV_MSG_SNAPSHOT_RESUME] = { "SNAPSHOT_RESUME", sizeof(struct skv_msg_stream) },
};

size_t skv_msg_body_size(uint16_t type)
{
	return type < SKV_MSG_TYPE_END ? proto_types[type].body : 0;
}

const char *skv_msg_name(uint16_t type)
{
	return type < SKV_MSG_TYPE_END && proto_types[type].name ? proto_types[type].name
								     : "unknown";
}

int skv_msg_send(int sock, uint16_t type, uint32_t seq, const void *body, const int *fds,
		 int n_fds)
{
	size_t body_len = skv_msg_body_size(type);
	if (!body_len || n_fds < 0 || n_fds > SKV_MSG_MAX_FDS)
		return -EINVAL;
	struct skv_msg_hdr hdr = {
		.magic = SKV_PROTO_MAGIC, .type = type, .len = (uint32_t)body_len, .seq = seq
	};
	struct iovec iov[2] = {
		{ .iov_base = &hdr, .iov_len = sizeof(hdr) },
		{ .iov_base = (void *)(uintptr_t)body, .iov_len = body_len },
	};
	union {
		char buf[CMSG_SPACE(sizeof(int) * SKV_MSG_MAX_FDS)];
		struct cmsghdr align;
	} ctl;
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
	if (n_fds) {
		memset(&ctl, 0, sizeof(ctl));
		mh.msg_control = ctl.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n_fds);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n_fds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n_fds);
	}
	ssize_t n;
	do
		n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if ((size_t)n != sizeof(hdr) + body_len)
		return -EMSGSIZE;
	return 0;
}

int skv_msg_recv(int sock, struct skv_msg_hdr *hdr, void *body, size_t body_cap, int *fds,
		 int *n_fds)
{
	/* One byte more than the largest message, so an oversized datagram shows as truncated. */
	union {
		uint8_t bytes[sizeof(struct skv_msg_hdr) + 2048];
		struct skv_msg_hdr align;
	} buf;
	union {
		char buf[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = buf.bytes, .iov_len = sizeof(buf.bytes) };
	struct msghdr mh = {
		.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
		.msg_controllen = sizeof(ctl.buf),
	};
	*n_fds = 0;
	ssize_t n;
	do
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;

	/* Collect every fd first, so that a refused message never leaks them. */
	int got[16], n_got = 0;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count && n_got < 16; i++)
			memcpy(&got[n_got++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
	}
	int err = 0;
	if (n == 0 && !n_got)
		return 0;
	if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || (size_t)n < sizeof(*hdr)) {
		err = -SKV_EFORMAT;
	} else {
		memcpy(hdr, buf.bytes, sizeof(*hdr));
		size_t want = skv_msg_body_size(hdr->type);
		if (hdr->magic != SKV_PROTO_MAGIC || !want || hdr->len != want ||
		    (size_t)n != sizeof(*hdr) + want || want > body_cap || hdr->flags)
			err = -SKV_EFORMAT;
		else
			memcpy(body, buf.bytes + sizeof(*hdr), want);
	}
	for (int i = 0; i < n_got; i++) {
		if (!err && i < SKV_MSG_MAX_FDS)
			fds[(*n_fds)++] = got[i];
		else
			close(got[i]);
	}
	return err ? err : 1;
}

int skv_default_socket_path(char *buf, size_t len)
{
	const char *runtime = getenv("XDG_RUNTIME_DIR");
	int n = runtime && *runtime ? snprintf(buf, len, "%s/streamkv/cached.sock", runtime)
				    : snprintf(buf, len, "/tmp/streamkv-%u/cached.sock",
					       (unsigned)getuid());
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int skv_msg_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = -errno;
		close(fd);
		return err;
	}
	return fd;
}
