/* What moves a conversation: the application/x-skv-conversation body (a versioned header, the
 * gateway's JSON state, the daemon's snapshot bytes), the daemon's snapshot and restore over an
 * admin connection with a memfd (the daemon never opens a path for us), a peer's export fetched
 * with libcurl, and the --state-dir file of name -> token.
 *
 * Everything here blocks (an admin round trip, an HTTP transfer, a file write): it runs on the
 * worker threads of http-backend.c, never on the backend thread itself, except the state file,
 * which the backend writes after a pass that changed a conversation. Nothing here touches the
 * gateway's tables. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>

#include "admin-conn.h"
#include "http-gw.h"
#include "proto.h"

#define MOVE_REPLY_TIMEOUT_MS 120000   /* a snapshot waits for the engine's step boundary */
#define MOVE_PEER_CONNECT_S 2L
#define MOVE_PEER_TOTAL_S 120L

static const char move_magic[8] = "SKVCONV";

uint64_t gw_fnv64(uint64_t h, const void *data, size_t len)
{
	const unsigned char *p = data;
	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 1099511628211ull;
	}
	return h;
}

/* ---- the body ------------------------------------------------------------------------------ */

static void move_put_u32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void move_put_u64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t move_get_u32(const unsigned char *p)
{
	uint32_t v = 0;
	for (int i = 3; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static uint64_t move_get_u64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

int gw_conv_pack(struct gw_buf *out, const char *json, size_t json_len, int snap_fd)
{
	struct stat st;
	if (fstat(snap_fd, &st) < 0)
		return -errno;
	size_t snap_len = (size_t)st.st_size;
	unsigned char h[GW_CONV_HEADER_BYTES] = { 0 };
	memcpy(h, move_magic, sizeof(move_magic));
	move_put_u32(h + 8, GW_CONV_MAJOR);
	move_put_u32(h + 12, GW_CONV_MINOR);
	move_put_u64(h + 16, json_len);
	move_put_u64(h + 24, snap_len);
	move_put_u64(h + 32, gw_fnv64(GW_FNV_SEED, json, json_len));
	out->len = 0;
	if (gw_buf_put(out, h, sizeof(h)) < 0 || gw_buf_put(out, json, json_len) < 0 ||
	    gw_buf_put(out, NULL, 0) < 0)
		return -ENOMEM;
	size_t at = out->len;
	if (at + snap_len + 1 > out->cap) {
		char *grown = realloc(out->data, at + snap_len + 1);
		if (!grown)
			return -ENOMEM;
		out->data = grown;
		out->cap = at + snap_len + 1;
	}
	for (size_t off = 0; off < snap_len;) {
		ssize_t n = pread(snap_fd, out->data + at + off, snap_len - off, (off_t)off);
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		off += (size_t)n;
	}
	out->len = at + snap_len;
	out->data[out->len] = '\0';
	return 0;
}

int gw_conv_unpack(const char *body, size_t len, json_t **state, const char **snap,
		   size_t *snap_len, char *msg, size_t msg_len)
{
	const unsigned char *h = (const unsigned char *)body;
	*state = NULL;
	if (len < sizeof(move_magic) || memcmp(h, move_magic, sizeof(move_magic))) {
		snprintf(msg, msg_len, "not an application/x-skv-conversation body (no SKVCONV "
			 "magic): export it with GET /v1/conversations/ID/export");
		return 400;
	}
	if (len < GW_CONV_HEADER_BYTES) {
		snprintf(msg, msg_len, "truncated conversation: %zu bytes, its header alone is %d",
			 len, GW_CONV_HEADER_BYTES);
		return 400;
	}
	uint32_t major = move_get_u32(h + 8), minor = move_get_u32(h + 12);
	if (major != GW_CONV_MAJOR) {
		snprintf(msg, msg_len, "conversation format %u.%u is %s than this gateway's %d.%d",
			 major, minor, major > GW_CONV_MAJOR ? "newer" : "older", GW_CONV_MAJOR,
			 GW_CONV_MINOR);
		return 422;
	}
	uint64_t json_len = move_get_u64(h + 16), snap_bytes = move_get_u64(h + 24);
	uint64_t avail = len - GW_CONV_HEADER_BYTES;
	if (json_len > avail || snap_bytes > avail - json_len) {
		snprintf(msg, msg_len, "truncated conversation: %zu bytes of %llu", len,
			 (unsigned long long)(GW_CONV_HEADER_BYTES + json_len + snap_bytes));
		return 400;
	}
	if (json_len + snap_bytes != avail) {
		snprintf(msg, msg_len, "corrupted conversation: %llu bytes after its parts",
			 (unsigned long long)(avail - json_len - snap_bytes));
		return 400;
	}
	const char *json = body + GW_CONV_HEADER_BYTES;
	if (gw_fnv64(GW_FNV_SEED, json, json_len) != move_get_u64(h + 32)) {
		snprintf(msg, msg_len, "corrupted conversation: its state does not match its "
			 "checksum");
		return 400;
	}
	json_error_t e;
	json_t *v = json_loadb(json, json_len, 0, &e);
	if (!v || !json_is_object(v)) {
		snprintf(msg, msg_len, "corrupted conversation: its state is not a JSON object "
			 "(%s)", v ? "another type" : e.text);
		json_decref(v);
		return 400;
	}
	*state = v;
	*snap = json + json_len;
	*snap_len = snap_bytes;
	return 0;
}

/* ---- the daemon's snapshot and restore ----------------------------------------------------- */

/* Send type with fd and wait for the ADMIN_RESULT (an ERROR ends it too). */
static int move_admin(const char *socket_path, uint16_t type, uint64_t stream_id, int fd,
		      struct skv_admin_result *out, char *msg, size_t msg_len)
{
	struct admin_conn c = { .sock = -1 };
	int err = admin_connect(&c, socket_path, msg, msg_len);
	if (err < 0)
		return err;
	struct skv_msg_admin_req req = { .stream_id = stream_id };
	err = skv_msg_send(c.sock, type, c.seq++, &req, &fd, 1);
	if (err < 0) {
		snprintf(msg, msg_len, "skv-cached at %s went away", socket_path);
		goto out;
	}
	for (;;) {
		struct pollfd pfd = { .fd = c.sock, .events = POLLIN };
		int ready = poll(&pfd, 1, MOVE_REPLY_TIMEOUT_MS);
		if (ready <= 0) {
			err = -ETIMEDOUT;
			snprintf(msg, msg_len, "skv-cached did not answer within %d s",
				 MOVE_REPLY_TIMEOUT_MS / 1000);
			goto out;
		}
		struct skv_msg_hdr h;
		union {
			struct skv_admin_result result;
			struct skv_msg_error error;
			uint8_t raw[2048];
		} body;
		int fds[SKV_MSG_MAX_FDS], n_fds = 0;
		int got = skv_msg_recv(c.sock, &h, &body, sizeof(body), fds, &n_fds);
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
		if (got <= 0) {
			err = got < 0 ? got : -EPIPE;
			snprintf(msg, msg_len, "skv-cached at %s went away", socket_path);
			goto out;
		}
		if (h.type == SKV_MSG_ERROR) {
			body.error.text[sizeof(body.error.text) - 1] = '\0';
			err = body.error.code < 0 ? body.error.code : -EREMOTEIO;
			snprintf(msg, msg_len, "%s", body.error.text);
			goto out;
		}
		if (h.type == SKV_MSG_ADMIN_RESULT) {
			*out = body.result;
			out->text[sizeof(out->text) - 1] = '\0';
			out->name[sizeof(out->name) - 1] = '\0';
			err = out->code < 0 ? out->code : 0;
			if (err)
				snprintf(msg, msg_len, "%s", out->text);
			goto out;
		}
	}
out:
	admin_disconnect(&c);
	return err;
}

int gw_move_snapshot(const char *socket_path, uint64_t stream_id, int *fd_out, char *msg,
		     size_t msg_len)
{
	*fd_out = -1;
	int fd = memfd_create("skv-http-export", MFD_CLOEXEC);
	if (fd < 0) {
		snprintf(msg, msg_len, "memfd_create: %s", strerror(errno));
		return -errno;
	}
	struct skv_admin_result r;
	int err = move_admin(socket_path, SKV_MSG_ADMIN_SNAPSHOT, stream_id, fd, &r, msg, msg_len);
	if (err < 0) {
		close(fd);
		return err;
	}
	*fd_out = fd;
	return 0;
}

int gw_move_restore(const char *socket_path, const void *snap, size_t len, char *name,
		    size_t name_len, char *token, size_t token_len, char *msg, size_t msg_len)
{
	int fd = memfd_create("skv-http-import", MFD_CLOEXEC);
	if (fd < 0) {
		snprintf(msg, msg_len, "memfd_create: %s", strerror(errno));
		return -errno;
	}
	for (size_t off = 0; off < len;) {
		ssize_t n = write(fd, (const char *)snap + off, len - off);
		if (n <= 0) {
			int err = n < 0 ? -errno : -EIO;
			snprintf(msg, msg_len, "cannot stage the snapshot: %s", strerror(-err));
			close(fd);
			return err;
		}
		off += (size_t)n;
	}
	struct skv_admin_result r;
	int err = move_admin(socket_path, SKV_MSG_ADMIN_RESTORE, 0, fd, &r, msg, msg_len);
	close(fd);
	if (err < 0)
		return err;
	snprintf(name, name_len, "%s", r.name);
	snprintf(token, token_len, "%.*s", SKV_TOKEN_HEX, r.text);
	return 0;
}

/* ---- a peer's export ----------------------------------------------------------------------- */

struct move_fetch {
	struct gw_buf *body;
	size_t limit;
	char *node;
	size_t node_len;
	const int *stop;
};

static size_t move_write(char *data, size_t size, size_t n, void *arg)
{
	struct move_fetch *f = arg;
	size_t len = size * n;
	if (f->body->len + len > f->limit || gw_buf_put(f->body, data, len) < 0)
		return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
	return len;
}

static size_t move_header(char *data, size_t size, size_t n, void *arg)
{
	struct move_fetch *f = arg;
	size_t len = size * n;
	static const char want[] = "x-skv-node:";
	if (len > sizeof(want) - 1 && !strncasecmp(data, want, sizeof(want) - 1)) {
		const char *v = data + sizeof(want) - 1;
		size_t vl = len - (sizeof(want) - 1);
		while (vl && (*v == ' ' || *v == '\t'))
			v++, vl--;
		while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
			vl--;
		snprintf(f->node, f->node_len, "%.*s", (int)vl, v);
	}
	return len;
}

static int move_progress(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	const struct move_fetch *f = arg;
	(void)dt, (void)dn, (void)ut, (void)un;
	return __atomic_load_n(f->stop, __ATOMIC_ACQUIRE) ? 1 : 0; /* 1: abort */
}

/* A libcurl handle for base + path (base's trailing slashes dropped; the full address into
 * url) with what every peer request has: key as a bearer token (appended to *headers), the
 * answer's body and X-Skv-Node into f, time-outs, http and https only. NULL: msg says why. */
static CURL *move_curl(const char *base, const char *path, const char *key,
		       struct curl_slist **headers, struct move_fetch *f, char *url, size_t url_len,
		       char *msg, size_t msg_len)
{
	CURL *curl = curl_easy_init();
	if (!curl) {
		snprintf(msg, msg_len, "cannot start libcurl");
		return NULL;
	}
	size_t bl = strlen(base);
	while (bl && base[bl - 1] == '/')
		bl--;
	snprintf(url, url_len, "%.*s%s", (int)bl, base, path);
	if (key) {
		char auth[512];
		snprintf(auth, sizeof(auth), "Authorization: Bearer %s", key);
		*headers = curl_slist_append(*headers, auth);
	}
	f->node[0] = '\0';
	f->body->len = 0;
	curl_easy_setopt(curl, CURLOPT_URL, url);
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, *headers);
	curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, move_write);
	curl_easy_setopt(curl, CURLOPT_WRITEDATA, f);
	curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, move_header);
	curl_easy_setopt(curl, CURLOPT_HEADERDATA, f);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, move_progress);
	curl_easy_setopt(curl, CURLOPT_XFERINFODATA, f);
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, MOVE_PEER_CONNECT_S);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT, MOVE_PEER_TOTAL_S);
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
	return curl;
}

/* Perform and free the request: the HTTP status, or -EHOSTUNREACH (msg says why); an answer
 * other than 200 gets its error message (the JSON error's, else the body) into msg. */
static int move_perform(CURL *curl, struct curl_slist *headers, const struct move_fetch *f,
			const char *url, char *msg, size_t msg_len)
{
	CURLcode rc = curl_easy_perform(curl);
	long status = 0;
	if (rc == CURLE_OK)
		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
	else
		snprintf(msg, msg_len, "%s: %s", url, curl_easy_strerror(rc));
	curl_slist_free_all(headers);
	curl_easy_cleanup(curl);
	if (rc != CURLE_OK)
		return -EHOSTUNREACH;
	if (status != 200) {
		const struct gw_buf *body = f->body;
		json_t *v = json_loadb(body->data ? body->data : "", body->len, 0, NULL);
		const char *m = json_string_value(
			json_object_get(json_object_get(v, "error"), "message"));
		snprintf(msg, msg_len, "%s answered %ld: %.300s", url, status,
			 m ? m : body->data ? body->data : "(no message)");
		json_decref(v);
	}
	return (int)status;
}

int gw_peer_fetch(const char *base, const char *id, const char *key, const int *stop,
		  struct gw_buf *body, char *node, size_t node_len, char *msg, size_t msg_len)
{
	char url[1024], path[GW_CONV_ID_MAX + 64];
	snprintf(path, sizeof(path), "/v1/conversations/%s/export?release=1", id);
	struct curl_slist *headers = NULL;
	struct move_fetch f = { .body = body, .limit = GW_CONV_MAX_BYTES, .node = node,
				.node_len = node_len, .stop = stop };
	CURL *curl = move_curl(base, path, key, &headers, &f, url, sizeof(url), msg, msg_len);
	if (!curl)
		return -ENOMEM;
	return move_perform(curl, headers, &f, url, msg, msg_len);
}

int gw_peer_put(const char *base, const char *id, const char *key, const char *body, size_t len,
		char *msg, size_t msg_len)
{
	char url[1024], path[GW_CONV_ID_MAX + 64];
	snprintf(path, sizeof(path), "/v1/conversations/%s", id);
	struct curl_slist *headers =
		curl_slist_append(NULL, "Content-Type: application/x-skv-conversation");
	headers = curl_slist_append(headers, "Expect:");
	headers = curl_slist_append(headers, "X-Skv-Give-Back: 1");
	struct gw_buf answer = { 0 };
	char node[GW_NODE_NAME_MAX];
	int stop = 0;
	struct move_fetch f = { .body = &answer, .limit = 1 << 20, .node = node,
				.node_len = sizeof(node), .stop = &stop };
	CURL *curl = move_curl(base, path, key, &headers, &f, url, sizeof(url), msg, msg_len);
	if (!curl) {
		curl_slist_free_all(headers);
		return -ENOMEM;
	}
	curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "PUT");
	curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
	int status = move_perform(curl, headers, &f, url, msg, msg_len);
	gw_buf_free(&answer);
	return status;
}

/* ---- --state-dir ----------------------------------------------------------------------------- */

int gw_state_save(const char *dir, const char *text, size_t len, char *msg, size_t msg_len)
{
	char path[4096], tmp[4200];
	snprintf(path, sizeof(path), "%s/%s", dir, GW_STATE_FILE);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		snprintf(msg, msg_len, "cannot write %s: %s", tmp, strerror(errno));
		return -errno;
	}
	int err = 0;
	for (size_t off = 0; off < len && !err;) {
		ssize_t n = write(fd, text + off, len - off);
		if (n <= 0)
			err = n < 0 ? -errno : -EIO;
		else
			off += (size_t)n;
	}
	if (close(fd) < 0 && !err)
		err = -errno;
	if (!err && rename(tmp, path) < 0)
		err = -errno;
	if (err) {
		snprintf(msg, msg_len, "cannot write %s: %s", path, strerror(-err));
		unlink(tmp);
	}
	return err;
}

json_t *gw_state_load(const char *dir, char *msg, size_t msg_len)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, GW_STATE_FILE);
	msg[0] = '\0';
	if (access(path, F_OK) < 0)
		return NULL;
	json_error_t e;
	json_t *v = json_load_file(path, 0, &e);
	if (!v || !json_is_array(json_object_get(v, "conversations"))) {
		snprintf(msg, msg_len, "%s: not a conversation list (%s)", path,
			 v ? "no \"conversations\" array" : e.text);
		json_decref(v);
		return NULL;
	}
	return v;
}
