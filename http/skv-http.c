/* skv-http: OpenAI-compatible HTTP in front of skv-cached.
 *
 *   skv-http --socket PATH [--listen ADDR:PORT] [--api-key KEY | --api-key-file FILE] ...
 *
 * Parses its flags strictly (one line on stderr and exit status 2 for a mistake), raises its
 * file limit to the hard limit (every SSE client holds a socket), starts the backend thread
 * (http-backend.c) and the HTTP server (http-server.c), and runs until SIGINT or SIGTERM. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <microhttpd.h>

#include "http-gw.h"

#define HTTP_EXIT_USAGE 2

static void http_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3),
								    noreturn));
static void http_die(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("skv-http: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(code);
}

static void http_usage(FILE *out)
{
	fprintf(out,
		"usage: skv-http --socket PATH [flags]\n"
		"OpenAI-compatible HTTP gateway to skv-cached: POST /v1/completions,\n"
		"POST /v1/chat/completions (SSE with \"stream\": true), GET /v1/models, GET /health,\n"
		"GET /metrics, DELETE /v1/conversations/ID, GET /v1/conversations/ID/export,\n"
		"PUT /v1/conversations/ID, POST /admin/drain, POST /admin/undrain.\n"
		"  --socket PATH            skv-cached's socket (required)\n"
		"  --listen ADDR:PORT       where to listen (default 127.0.0.1:8080; [::1]:PORT for\n"
		"                           IPv6; port 0: any free port, printed at start)\n"
		"  --api-key KEY            every request but /health needs Authorization: Bearer KEY\n"
		"                           (repeat for several keys; a conversation belongs to the\n"
		"                           key that opened it)\n"
		"  --api-key-file FILE      keys, one per line (# comments)\n"
		"  --node-name NAME         this node's name: X-Skv-Node on every response, \"node\"\n"
		"                           in /health (default: the host name)\n"
		"  --state-dir DIR          keep each conversation's stream name and token in\n"
		"                           DIR/conversations.json (0600): a restarted skv-http\n"
		"                           attaches them again\n"
		"  --peers URL,URL          other nodes' skv-http: a conversation unknown here is\n"
		"                           pulled from them (export?release=1) before a new one\n"
		"  --peer-key KEY           the key of requests between nodes (export, import,\n"
		"                           drain); sent to --peers\n"
		"  --snapshot-dir DIR       export every conversation into DIR as ID.skvconv each\n"
		"                           --snapshot-interval seconds; restore from it when no\n"
		"                           peer has a conversation\n"
		"  --snapshot-interval S    seconds between --snapshot-dir exports (default 60)\n"
		"  --model-name NAME        the model's id (default: the daemon's model file name\n"
		"                           without extension)\n"
		"  --max-body BYTES         largest request body (default 1048576; larger: 413)\n"
		"  --max-concurrent N       generation requests in progress at once (default 2048;\n"
		"                           more: 429)\n"
		"  --max-tokens N           largest max_tokens a request may ask for (default 4096)\n"
		"  --conversation-idle S    close a conversation idle this many seconds (default 600)\n"
		"  --max-window N           largest \"window\" a request may ask for (default 4096)\n"
		"  --max-sink N             largest \"sink\" a request may ask for (default 64)\n"
		"  --chat-template NAME     how chat messages become text: %s, or auto (the\n"
		"                           default: the one the model's tokenizer.chat_template\n"
		"                           names; story when it names none)\n"
		"  --help                   this text\n",
		gw_template_names());
}

static long long http_parse_int(const char *flag, const char *text, long long lo, long long hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		http_die(HTTP_EXIT_USAGE, "%s: '%s' is not a whole number in [%lld, %lld]", flag,
			 text, lo, hi);
	return v;
}

static void http_parse_listen(struct gw_opts *o, const char *text)
{
	const char *colon = strrchr(text, ':');
	if (!colon)
		http_die(HTTP_EXIT_USAGE, "--listen: '%s' is not ADDR:PORT", text);
	const char *host = text;
	size_t host_len = (size_t)(colon - text);
	if (host_len >= 2 && host[0] == '[' && host[host_len - 1] == ']') {
		host++;
		host_len -= 2;
	}
	if (!host_len || host_len >= sizeof(o->listen_host))
		http_die(HTTP_EXIT_USAGE, "--listen: '%s' has no address before the port", text);
	memcpy(o->listen_host, host, host_len);
	o->listen_host[host_len] = '\0';
	o->listen_port = (uint16_t)http_parse_int("--listen (port)", colon + 1, 0, 65535);
}

/* --peers: a comma-separated list of http:// or https:// base URLs. */
static void http_parse_peers(struct gw_opts *o, const char *text)
{
	char *copy = strdup(text), *save = NULL;
	if (!copy)
		http_die(1, "out of memory");
	for (char *p = strtok_r(copy, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
		if (strncmp(p, "http://", 7) && strncmp(p, "https://", 8))
			http_die(HTTP_EXIT_USAGE, "--peers: '%s' is not an http:// or https:// URL", p);
		if (strlen(p) > 512)
			http_die(HTTP_EXIT_USAGE, "--peers: '%.40s...' is longer than 512 bytes", p);
		char **peers = realloc(o->peers, (o->n_peers + 1) * sizeof(*peers));
		if (!peers || !(peers[o->n_peers] = strdup(p)))
			http_die(1, "out of memory");
		o->peers = peers;
		o->n_peers++;
	}
	free(copy);
	if (!o->n_peers)
		http_die(HTTP_EXIT_USAGE, "--peers: no URL in '%s'", text);
}

/* A directory skv-http writes into (--state-dir, --snapshot-dir). */
static void http_check_dir(const char *flag, const char *dir)
{
	struct stat st;
	if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode) || access(dir, W_OK | X_OK) < 0)
		http_die(1, "%s: %s is not a directory skv-http can write", flag, dir);
	if (strlen(dir) > 3800)
		http_die(HTTP_EXIT_USAGE, "%s: the path is too long", flag);
}

static void http_add_key(struct gw_opts *o, const char *key, const char *flag)
{
	if (!key[0])
		http_die(HTTP_EXIT_USAGE, "%s: an empty key", flag);
	char **keys = realloc(o->api_keys, (o->n_api_keys + 1) * sizeof(*keys));
	if (!keys || !(keys[o->n_api_keys] = strdup(key)))
		http_die(1, "out of memory");
	o->api_keys = keys;
	o->n_api_keys++;
}

/* One key per line; blank lines and lines starting with # are skipped. */
static void http_read_keys(struct gw_opts *o, const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		http_die(1, "--api-key-file: cannot open %s: %s", path, strerror(errno));
	char line[1024];
	size_t before = o->n_api_keys;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\r\n")] = '\0';
		if (line[0] && line[0] != '#')
			http_add_key(o, line, "--api-key-file");
	}
	fclose(f);
	if (o->n_api_keys == before)
		http_die(1, "--api-key-file: %s holds no key", path);
}

enum {
	OPT_SOCKET = 256,
	OPT_LISTEN,
	OPT_API_KEY,
	OPT_API_KEY_FILE,
	OPT_MODEL_NAME,
	OPT_MAX_BODY,
	OPT_MAX_CONCURRENT,
	OPT_MAX_TOKENS,
	OPT_CONV_IDLE,
	OPT_MAX_WINDOW,
	OPT_MAX_SINK,
	OPT_CHAT_TEMPLATE,
	OPT_NODE_NAME,
	OPT_STATE_DIR,
	OPT_PEERS,
	OPT_PEER_KEY,
	OPT_SNAPSHOT_DIR,
	OPT_SNAPSHOT_INTERVAL,
	OPT_HELP,
};

static const struct option http_long_opts[] = {
	{ "socket", required_argument, NULL, OPT_SOCKET },
	{ "listen", required_argument, NULL, OPT_LISTEN },
	{ "api-key", required_argument, NULL, OPT_API_KEY },
	{ "api-key-file", required_argument, NULL, OPT_API_KEY_FILE },
	{ "model-name", required_argument, NULL, OPT_MODEL_NAME },
	{ "max-body", required_argument, NULL, OPT_MAX_BODY },
	{ "max-concurrent", required_argument, NULL, OPT_MAX_CONCURRENT },
	{ "max-tokens", required_argument, NULL, OPT_MAX_TOKENS },
	{ "conversation-idle", required_argument, NULL, OPT_CONV_IDLE },
	{ "max-window", required_argument, NULL, OPT_MAX_WINDOW },
	{ "max-sink", required_argument, NULL, OPT_MAX_SINK },
	{ "chat-template", required_argument, NULL, OPT_CHAT_TEMPLATE },
	{ "node-name", required_argument, NULL, OPT_NODE_NAME },
	{ "state-dir", required_argument, NULL, OPT_STATE_DIR },
	{ "peers", required_argument, NULL, OPT_PEERS },
	{ "peer-key", required_argument, NULL, OPT_PEER_KEY },
	{ "snapshot-dir", required_argument, NULL, OPT_SNAPSHOT_DIR },
	{ "snapshot-interval", required_argument, NULL, OPT_SNAPSHOT_INTERVAL },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

static void http_parse_opts(int argc, char **argv, struct gw_opts *o)
{
	memset(o, 0, sizeof(*o));
	snprintf(o->listen_host, sizeof(o->listen_host), "127.0.0.1");
	o->listen_port = 8080;
	o->max_body = 1048576;
	o->max_concurrent = 2048;
	o->max_tokens = 4096;
	o->conversation_idle = 600;
	o->max_window = 4096;
	o->max_sink = 64;
	o->tmpl_auto = 1;
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", http_long_opts, NULL)) != -1) {
		switch (c) {
		case OPT_SOCKET: o->socket_path = optarg; break;
		case OPT_LISTEN: http_parse_listen(o, optarg); break;
		case OPT_API_KEY: http_add_key(o, optarg, "--api-key"); break;
		case OPT_API_KEY_FILE: http_read_keys(o, optarg); break;
		case OPT_MODEL_NAME:
			if (!optarg[0] || strlen(optarg) >= GW_MODEL_NAME_MAX)
				http_die(HTTP_EXIT_USAGE, "--model-name: give 1 to %d bytes",
					 GW_MODEL_NAME_MAX - 1);
			o->model_name = optarg;
			break;
		case OPT_NODE_NAME:
			if (!optarg[0] || strlen(optarg) >= GW_NODE_NAME_MAX ||
			    strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
					   "0123456789._-") != strlen(optarg))
				http_die(HTTP_EXIT_USAGE, "--node-name: give 1 to %d of A-Z a-z 0-9 . _ -",
					 GW_NODE_NAME_MAX - 1);
			snprintf(o->node_name, sizeof(o->node_name), "%s", optarg);
			break;
		case OPT_STATE_DIR: o->state_dir = optarg; break;
		case OPT_PEERS: http_parse_peers(o, optarg); break;
		case OPT_PEER_KEY:
			if (!optarg[0])
				http_die(HTTP_EXIT_USAGE, "--peer-key: an empty key");
			o->peer_key = optarg;
			break;
		case OPT_SNAPSHOT_DIR: o->snapshot_dir = optarg; break;
		case OPT_SNAPSHOT_INTERVAL:
			o->snapshot_interval =
				(unsigned)http_parse_int("--snapshot-interval", optarg, 1, 1ll << 31);
			break;
		case OPT_MAX_BODY:
			o->max_body = (size_t)http_parse_int("--max-body", optarg, 1, 1ll << 30);
			break;
		case OPT_MAX_CONCURRENT:
			o->max_concurrent =
				(unsigned)http_parse_int("--max-concurrent", optarg, 1, 1 << 20);
			break;
		case OPT_MAX_TOKENS:
			o->max_tokens = (uint64_t)http_parse_int("--max-tokens", optarg, 1, 1ll << 40);
			break;
		case OPT_CONV_IDLE:
			o->conversation_idle =
				(unsigned)http_parse_int("--conversation-idle", optarg, 1, 1ll << 31);
			break;
		case OPT_MAX_WINDOW:
			o->max_window = http_parse_int("--max-window", optarg, 1, 1ll << 31);
			break;
		case OPT_MAX_SINK:
			o->max_sink = http_parse_int("--max-sink", optarg, 0, 1ll << 20);
			break;
		case OPT_CHAT_TEMPLATE:
			o->tmpl_auto = !strcmp(optarg, "auto");
			o->tmpl = o->tmpl_auto ? NULL : gw_template_find(optarg);
			if (!o->tmpl_auto && !o->tmpl)
				http_die(HTTP_EXIT_USAGE,
					 "--chat-template: unknown template '%s' (%s, auto)", optarg,
					 gw_template_names());
			break;
		case 'h':
		case OPT_HELP: http_usage(stdout); exit(0);
		case ':': http_die(HTTP_EXIT_USAGE, "%s needs a value", argv[optind - 1]);
		default:
			http_die(HTTP_EXIT_USAGE, "unknown flag '%s' (see skv-http --help)",
				 argv[optind - 1]);
		}
	}
	if (optind < argc)
		http_die(HTTP_EXIT_USAGE, "unexpected argument '%s' (see skv-http --help)",
			 argv[optind]);
	if (!o->socket_path)
		http_die(HTTP_EXIT_USAGE, "--socket PATH is required (skv-cached's socket)");
	if (strlen(o->socket_path) >= 108)
		http_die(HTTP_EXIT_USAGE, "--socket: the path is longer than a Unix socket allows");
	if (o->snapshot_interval && !o->snapshot_dir)
		http_die(HTTP_EXIT_USAGE, "--snapshot-interval needs --snapshot-dir DIR");
	if (!o->snapshot_interval)
		o->snapshot_interval = 60;
	if (o->state_dir)
		http_check_dir("--state-dir", o->state_dir);
	if (o->snapshot_dir)
		http_check_dir("--snapshot-dir", o->snapshot_dir);
	if (!o->node_name[0] && (gethostname(o->node_name, sizeof(o->node_name)) < 0 ||
				 !o->node_name[0]))
		snprintf(o->node_name, sizeof(o->node_name), "skv-http");
	o->node_name[sizeof(o->node_name) - 1] = '\0';
}

/* Every client holds a socket: take as many descriptors as the hard limit allows. */
static void http_raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int main(int argc, char **argv)
{
	struct gw gw;
	memset(&gw, 0, sizeof(gw));
	http_parse_opts(argc, argv, &gw.opts);
	snprintf(gw.model_name, sizeof(gw.model_name), "%s",
		 gw.opts.model_name ? gw.opts.model_name : "default");
	pthread_mutex_init(&gw.lock, NULL);
	http_raise_nofile();
	signal(SIGPIPE, SIG_IGN);

	/* Signals are taken by sigwait below, in this thread only. */
	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGINT);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGUSR1); /* drain */
	pthread_sigmask(SIG_BLOCK, &stop, NULL);

	int err = gw_backend_start(&gw);
	if (err < 0)
		http_die(1, "cannot start: %s", strerror(-err));
	struct MHD_Daemon *d;
	char msg[256];
	if (gw_server_start(&gw, &d, msg, sizeof(msg)) < 0) {
		gw_backend_stop(&gw);
		http_die(1, "%s", msg);
	}
	const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
	fprintf(stderr, "skv-http: listening on http://%s%s%s:%u/ (model %s, daemon %s)\n",
		strchr(gw.opts.listen_host, ':') ? "[" : "", gw.opts.listen_host,
		strchr(gw.opts.listen_host, ':') ? "]" : "",
		info ? info->port : gw.opts.listen_port, gw.model_name, gw.opts.socket_path);
	int sig;
	while (sigwait(&stop, &sig) == 0 && sig == SIGUSR1) {
		__atomic_store_n(&gw.draining, 1, __ATOMIC_RELEASE);
		fprintf(stderr, "skv-http: SIGUSR1: draining (POST /admin/undrain ends it)\n");
	}
	fprintf(stderr, "skv-http: %s: stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
	/* The backend ends every job first, resuming their connections: libmicrohttpd stops only
	 * a daemon without suspended connections. */
	MHD_quiesce_daemon(d);
	gw_backend_stop(&gw);
	MHD_stop_daemon(d);
	for (size_t i = 0; i < gw.opts.n_api_keys; i++)
		free(gw.opts.api_keys[i]);
	free(gw.opts.api_keys);
	return 0;
}
