/* skv-cached: flags, start-up and shutdown. The event loop is in daemon.c. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "daemon-pvt.h"
#include "forward.h"
#include "kv-layout.h"
#include "model.h"
#include "skv-error.h"
#include "stream.h"
#include "topology.h"

#ifndef SKV_MODEL_DIR
#define SKV_MODEL_DIR "models/stories260K"
#endif

#define CACHED_EXIT_USAGE 2
#define CACHED_DEFAULT_ARENA_MB 256
/* --engine-threads auto: from this many bytes of weights on, a decode step is bound by the
 * memory bus, which one core cannot saturate (tools/README.md, "Threads"): such a model gets
 * engines of every core of a node. Below it one single-threaded engine per core is faster. */
#define CACHED_BIG_MODEL_BYTES (64ull << 20)
#define CACHED_BIG_MODEL_TEXT "64 MiB"

struct cached_opts {
	const char *socket_path;
	const char *model_path;
	const char *tokenizer_path;
	const char *engine_bin;
	const char *group;
	const char *numa;
	long long arena_mb;
	long long token_budget;
	long long engines;
	long long engine_threads; /* 0: auto */
	const char *engine_weights; /* --engine-weights: auto, map or huge */
	enum skv_huge_mode huge;
	enum skv_wait_backend wait;
	int prefault;
	int verbose;
	long long max_streams;
	int admission_queue;
	long long queue_timeout_s;
	long long queue_max;
	long long idle_timeout_s;
	long long detach_timeout_s;
	const char *admin_group;
	const char *state_dir;
	long long snapshot_interval_s;
};

static void cached_usage(FILE *out)
{
	fputs("usage: skv-cached [flags]\n"
	      "  --socket PATH        control socket (default $XDG_RUNTIME_DIR/streamkv/cached.sock)\n"
	      "  --model PATH         model to serve (default: the shipped stories260K)\n"
	      "  --tokenizer PATH     llama2.c tokenizer (default: tok<vocab>.bin next to a .bin model)\n"
	      "  --arena-mb N         KV arena size per NUMA node in MiB (default 256)\n"
	      "  --tokens N           size each arena for N tokens of KV instead, counted in\n"
	      "                       default sink streams (N / trained length of them)\n"
	      "  --hugepages MODE     auto (default), on (fail without reserved huge pages), off\n"
	      "  --numa SPEC          auto (default: every node), off, or a node list such as 0,2-3\n"
	      "  --engines N          engine processes (default: one per core of the used nodes,\n"
	      "                       or one per --engine-threads cores)\n"
	      "  --engine-threads N   matmul threads (cores) of each engine, or auto (default: 1\n"
	      "                       for models under " CACHED_BIG_MODEL_TEXT " of weights, else every core of a node)\n"
	      "  --engine-weights M   where engines keep the weights they read in place: map (the\n"
	      "                       file's mapping, shared by all), huge (a private copy on\n"
	      "                       transparent huge pages: faster decode, the file's size per\n"
	      "                       engine), auto (default: huge from 64 MiB of such weights)\n"
	      "  --group NAME         also admit members of this group (socket mode 0660)\n"
	      "  --wait MODE          how engines sleep: auto (default), uring, futex\n"
	      "  --engine-bin PATH    the skv-engine executable (default: next to skv-cached)\n"
	      "  --max-streams N      at most N streams hold KV at once (default: as many as fit)\n"
	      "  --admission MODE     when no stream fits: reject (default: ERROR at once) or queue\n"
	      "                       (the OPEN waits, first come first placed, until room frees)\n"
	      "  --queue-timeout SEC  queue: answer ERROR after waiting this long (default 60)\n"
	      "  --queue-max N        queue: at most N OPENs wait; more are refused (default 1024)\n"
	      "  --idle-timeout SEC   close streams with no traffic for SEC seconds (default 0:\n"
	      "                       never); a stream may ask for its own, up to a week\n"
	      "  --detach-timeout SEC close a detached resumable stream (its client gone) after\n"
	      "                       SEC seconds unless it has an idle time-out (default 3600)\n"
	      "  --admin-group NAME   members may read stream contents (token ids, window text)\n"
	      "                       with skv-admin; otherwise only this uid and root may\n"
	      "  --state-dir DIR      on SIGTERM/SIGINT snapshot every resumable stream into DIR,\n"
	      "                       and restore DIR's snapshots at start (detached: their\n"
	      "                       clients attach with name and token as before)\n"
	      "  --snapshot-interval SEC  with --state-dir: also snapshot them every SEC seconds,\n"
	      "                       so that a kill -9 of the daemon loses at most that much\n"
	      "  --prefault           fault the arenas in at start\n"
	      "  --verbose            log every stream, and how many default streams an arena holds\n",
	      out);
}

static void cached_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void cached_die(int code, const char *fmt, ...)
{
	va_list ap;
	fputs("skv-cached: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static long long cached_parse_int(const char *flag, const char *text, long long lo, long long hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		cached_die(CACHED_EXIT_USAGE, "%s: '%s' is not a whole number in [%lld, %lld]", flag,
			   text, lo, hi);
	return v;
}

static void cached_parse(int argc, char **argv, struct cached_opts *o)
{
	static const struct option longs[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "model", required_argument, NULL, 'm' },
		{ "tokenizer", required_argument, NULL, 'T' },
		{ "arena-mb", required_argument, NULL, 'a' },
		{ "tokens", required_argument, NULL, 't' },
		{ "hugepages", required_argument, NULL, 'H' },
		{ "numa", required_argument, NULL, 'N' },
		{ "engines", required_argument, NULL, 'e' },
		{ "engine-threads", required_argument, NULL, 'E' },
		{ "engine-weights", required_argument, NULL, 'W' },
		{ "group", required_argument, NULL, 'g' },
		{ "wait", required_argument, NULL, 'w' },
		{ "engine-bin", required_argument, NULL, 'b' },
		{ "max-streams", required_argument, NULL, 'M' },
		{ "admission", required_argument, NULL, 'A' },
		{ "queue-timeout", required_argument, NULL, 'Q' },
		{ "queue-max", required_argument, NULL, 'q' },
		{ "idle-timeout", required_argument, NULL, 'I' },
		{ "detach-timeout", required_argument, NULL, 'D' },
		{ "admin-group", required_argument, NULL, 'G' },
		{ "state-dir", required_argument, NULL, 'S' },
		{ "snapshot-interval", required_argument, NULL, 'P' },
		{ "prefault", no_argument, NULL, 'p' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	memset(o, 0, sizeof(*o));
	o->numa = "auto";
	o->arena_mb = -1;
	o->token_budget = -1;
	o->queue_timeout_s = -1;
	o->queue_max = -1;
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longs, NULL)) != -1) {
		switch (c) {
		case 's': o->socket_path = optarg; break;
		case 'm': o->model_path = optarg; break;
		case 'T': o->tokenizer_path = optarg; break;
		case 'a': o->arena_mb = cached_parse_int("--arena-mb", optarg, 1, 1 << 30); break;
		case 't': o->token_budget = cached_parse_int("--tokens", optarg, 1, 1ll << 40); break;
		case 'H':
			if (skv_huge_mode_parse(optarg, &o->huge) < 0)
				cached_die(CACHED_EXIT_USAGE, "--hugepages: '%s' is not auto, on or off",
					   optarg);
			break;
		case 'N': o->numa = optarg; break;
		case 'e': o->engines = cached_parse_int("--engines", optarg, 1, CACHED_MAX_ENGINES); break;
		case 'E':
			o->engine_threads = !strcmp(optarg, "auto") ? 0
					    : cached_parse_int("--engine-threads", optarg, 1, 256);
			break;
		case 'W': {
			enum skv_weights_mem mode;
			if (skv_weights_mem_parse(optarg, &mode) < 0)
				cached_die(CACHED_EXIT_USAGE,
					   "--engine-weights: '%s' is not auto, map or huge", optarg);
			o->engine_weights = skv_weights_mem_name(mode);
			break;
		}
		case 'g': o->group = optarg; break;
		case 'w':
			if (!strcmp(optarg, "auto"))
				o->wait = SKV_WAIT_AUTO;
			else if (!strcmp(optarg, "uring"))
				o->wait = SKV_WAIT_URING;
			else if (!strcmp(optarg, "futex"))
				o->wait = SKV_WAIT_FUTEX;
			else
				cached_die(CACHED_EXIT_USAGE, "--wait: '%s' is not auto, uring or futex",
					   optarg);
			break;
		case 'M':
			o->max_streams = cached_parse_int("--max-streams", optarg, 1, 1ll << 40);
			break;
		case 'A':
			if (!strcmp(optarg, "reject"))
				o->admission_queue = 0;
			else if (!strcmp(optarg, "queue"))
				o->admission_queue = 1;
			else
				cached_die(CACHED_EXIT_USAGE, "--admission: '%s' is not reject or queue",
					   optarg);
			break;
		case 'Q':
			o->queue_timeout_s = cached_parse_int("--queue-timeout", optarg, 1, 86400);
			break;
		case 'q':
			o->queue_max = cached_parse_int("--queue-max", optarg, 1, CACHED_MAX_FDS);
			break;
		case 'I':
			o->idle_timeout_s = cached_parse_int("--idle-timeout", optarg, 0,
							     CACHED_IDLE_MAX_S);
			break;
		case 'D':
			o->detach_timeout_s = cached_parse_int("--detach-timeout", optarg, 1,
							       CACHED_IDLE_MAX_S);
			break;
		case 'G': o->admin_group = optarg; break;
		case 'S': o->state_dir = optarg; break;
		case 'P':
			o->snapshot_interval_s = cached_parse_int("--snapshot-interval", optarg, 1,
								  CACHED_IDLE_MAX_S);
			break;
		case 'b': o->engine_bin = optarg; break;
		case 'p': o->prefault = 1; break;
		case 'v': o->verbose = 1; break;
		case 'h': cached_usage(stdout); exit(0);
		case ':': cached_die(CACHED_EXIT_USAGE, "%s needs a value", argv[optind - 1]);
		default:
			cached_die(CACHED_EXIT_USAGE, "unknown flag '%s' (see skv-cached --help)",
				   argv[optind - 1]);
		}
	}
	if (optind < argc)
		cached_die(CACHED_EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
	if (o->arena_mb > 0 && o->token_budget > 0)
		cached_die(CACHED_EXIT_USAGE, "give --arena-mb or --tokens, not both");
	if (!o->admission_queue && (o->queue_timeout_s > 0 || o->queue_max > 0))
		cached_die(CACHED_EXIT_USAGE, "--queue-timeout and --queue-max need --admission queue");
	if (o->queue_timeout_s < 0)
		o->queue_timeout_s = 60;
	if (o->queue_max < 0)
		o->queue_max = 1024;
}

/* Descriptors: the daemon holds two per client (socket, doorbell page) and one per queued
 * OPEN, and each engine, which inherits the limit, one per stream it serves (the client's
 * eventfd). Allow what the hard limit allows (capped by the event loop's fd table), and say so
 * when that is too little for thousands of streams. */
#define CACHED_NOFILE_WANT 8192

static void cached_raise_nofile(void)
{
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) < 0)
		return;
	rlim_t want = nofile.rlim_max < CACHED_MAX_FDS ? nofile.rlim_max : CACHED_MAX_FDS;
	if (nofile.rlim_cur < want) {
		nofile.rlim_cur = want;
		if (setrlimit(RLIMIT_NOFILE, &nofile) < 0)
			cached_log("cannot raise the descriptor limit to %llu: %s",
				   (unsigned long long)want, strerror(errno));
	}
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < CACHED_NOFILE_WANT)
		cached_log("the descriptor limit is %llu (hard %llu): an engine serves fewer streams "
			   "than that and the daemon about half as many clients; raise the hard "
			   "limit (ulimit -Hn, LimitNOFILE=) to serve thousands",
			   (unsigned long long)nofile.rlim_cur, (unsigned long long)nofile.rlim_max);
}

/* The KV region of a stream with the default policy (sink: 4 sinks + the rest of the trained
 * length as window), and what it takes in an arena (its allocator size class). */
static int cached_default_stream(const struct skv_model *m, struct skv_policy *p,
				 uint64_t *region_bytes, uint64_t *arena_bytes)
{
	char msg[256];
	struct skv_kv_desc desc;
	skv_policy_default(p);
	int err = skv_policy_resolve(p, m->cfg.seq_len, msg, sizeof(msg));
	if (!err)
		err = skv_kv_layout_init(&desc, (uint32_t)m->cfg.n_layers,
					 (uint32_t)m->cfg.n_kv_heads, (uint32_t)m->cfg.head_size,
					 (uint32_t)p->sink_slots, (uint32_t)p->window_slots);
	if (err)
		return err;
	*region_bytes = desc.region_bytes;
	*arena_bytes = skv_arena_class_bytes(skv_arena_class_of(desc.region_bytes));
	return 0;
}

/* The model's weights packed once into a sealed memfd that every engine maps read-only. */
static int cached_pack_weights(struct cached *d)
{
	size_t bytes = skv_pack_floats(d->model) * sizeof(float);
	int fd = memfd_create("skv-weights", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	float *p = MAP_FAILED;
	int err = 0;
	/* A fully quantized model has no F32 matrix to pack: the memfd stays empty and engines
	 * read every weight in place from the model file. */
	if (ftruncate(fd, (off_t)bytes) < 0 ||
	    (bytes && (p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) ==
			      MAP_FAILED))
		err = -errno;
	if (!err) {
		if (bytes) {
			skv_pack_weights(d->model, p);
			munmap(p, bytes);
		}
		/* Nobody may change them from now on: engines rely on it. */
		if (fcntl(fd, F_ADD_SEALS,
			  F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
			err = -errno;
	}
	if (err) {
		close(fd);
		return err;
	}
	d->weights_fd = fd;
	d->weights_bytes = bytes;
	return 0;
}

static int cached_mkdir_parent(const char *path)
{
	char dir[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

static int cached_listen(struct cached *d)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(d->socket_path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, d->socket_path);
	int err = cached_mkdir_parent(d->socket_path);
	if (err < 0)
		return err;
	/* A socket file left by a dead daemon is replaced; a live daemon's is not. */
	int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (probe >= 0) {
		if (connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			return -EADDRINUSE;
		}
		close(probe);
	}
	unlink(d->socket_path);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	mode_t old = umask(d->have_group ? 0117 : 0177);
	int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (rc < 0 || listen(fd, 128) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	if (d->have_group && chown(d->socket_path, (uid_t)-1, d->group) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	d->listen_fd = fd;
	return 0;
}

static const char *cached_find_engine_bin(void)
{
	static char path[PATH_MAX];
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0)
		return "skv-engine";
	self[n] = '\0';
	char *dir = dirname(self);
	/* Installed side by side, or in the build tree's engine/ directory. */
	if (snprintf(path, sizeof(path), "%s/skv-engine", dir) < (int)sizeof(path) &&
	    access(path, X_OK) == 0)
		return path;
	if (snprintf(path, sizeof(path), "%s/../engine/skv-engine", dir) < (int)sizeof(path) &&
	    access(path, X_OK) == 0)
		return path;
	return "skv-engine";
}

static void cached_shutdown(struct cached *d)
{
	if (d->listen_fd >= 0) {
		close(d->listen_fd);
		unlink(d->socket_path);
	}
	/* Engines exit on their own when their connection drops; make sure of it. */
	for (struct cached_conn *c = d->conns; c; c = c->next)
		if (c->fd >= 0) {
			close(c->fd);
			c->fd = -1;
		}
	/* An engine asleep on a futex does not see its socket close: ring it. */
	for (unsigned i = 0; i < d->n_engines; i++)
		if (d->engines[i].doorbell)
			skv_wake(d->engines[i].doorbell, d->engines[i].efd);
	double deadline = 0;
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	deadline = (double)ts.tv_sec + 3.0;
	for (unsigned i = 0; i < d->n_engines; i++) {
		struct cached_engine *e = &d->engines[i];
		if (!e->supervised || e->pid <= 0)
			continue;
		for (;;) {
			if (waitpid(e->pid, NULL, WNOHANG) == e->pid)
				break;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			if ((double)ts.tv_sec > deadline) {
				kill(e->pid, SIGKILL);
				waitpid(e->pid, NULL, 0);
				break;
			}
			usleep(10000);
		}
	}
	for (unsigned a = 0; a < d->n_arenas; a++)
		skv_arena_destroy(d->arenas[a]);
	skv_model_close(d->model);
}

int main(int argc, char **argv)
{
	struct cached_opts o;
	cached_parse(argc, argv, &o);
	static struct cached d; /* large (the fd tag table): not on the stack */
	char msg[512] = "";
	d.listen_fd = d.signal_fd = d.weights_fd = -1;
	d.uid = getuid();
	d.verbose = o.verbose;
	d.wait_backend = o.wait;
	d.next_stream_id = 1;
	d.started_at = cached_now();
	d.instance = skv_arena_instance_id_new();
	signal(SIGPIPE, SIG_IGN);
	d.max_streams = (uint64_t)o.max_streams;
	d.admission_queue = o.admission_queue;
	d.queue_timeout_s = (uint32_t)o.queue_timeout_s;
	d.queue_max = (uint32_t)o.queue_max;
	d.idle_timeout_s = (uint32_t)o.idle_timeout_s;
	d.detach_timeout_s = o.detach_timeout_s ? (uint32_t)o.detach_timeout_s : 3600u;
	cached_raise_nofile();

	if (o.socket_path) {
		if (strlen(o.socket_path) >= sizeof(d.socket_path))
			cached_die(CACHED_EXIT_USAGE, "--socket: path longer than %zu bytes",
				   sizeof(d.socket_path) - 1);
		snprintf(d.socket_path, sizeof(d.socket_path), "%s", o.socket_path);
	} else if (skv_default_socket_path(d.socket_path, sizeof(d.socket_path)) < 0) {
		cached_die(CACHED_EXIT_USAGE, "the default socket path is too long; use --socket");
	}
	if (o.group) {
		struct group *g = getgrnam(o.group);
		if (!g)
			cached_die(CACHED_EXIT_USAGE, "--group: no group named '%s'", o.group);
		d.group = g->gr_gid;
		d.have_group = 1;
	}
	if (o.state_dir) {
		struct stat sd;
		if (stat(o.state_dir, &sd) < 0 || !S_ISDIR(sd.st_mode) ||
		    access(o.state_dir, W_OK | X_OK) < 0)
			cached_die(CACHED_EXIT_USAGE, "--state-dir: %s is not a directory this user "
				   "can write", o.state_dir);
		d.state_dir = o.state_dir;
		d.restore_due = 1;
	}
	if (o.snapshot_interval_s && !o.state_dir)
		cached_die(CACHED_EXIT_USAGE, "--snapshot-interval needs --state-dir DIR");
	d.snapshot_interval_s = (uint32_t)o.snapshot_interval_s;
	if (o.admin_group) {
		struct group *g = getgrnam(o.admin_group);
		if (!g)
			cached_die(CACHED_EXIT_USAGE, "--admin-group: no group named '%s'",
				   o.admin_group);
		d.admin_group = g->gr_gid;
		d.have_admin_group = 1;
	}

	static char model_path[PATH_MAX], tok_path[PATH_MAX];
	if (o.model_path) {
		if (!realpath(o.model_path, model_path))
			cached_die(1, "%s: %s", o.model_path, strerror(errno));
	} else {
		/* $SKV_MODEL_DIR, else the source tree's model while it exists, else the copy
		 * meson install put under share/streamkv. */
		const char *dir = getenv("SKV_MODEL_DIR");
		struct stat st;
		if (!dir || !*dir)
			dir = SKV_MODEL_DIR;
#ifdef SKV_INSTALLED_MODEL_DIR
		if (dir == (const char *)SKV_MODEL_DIR && stat(SKV_MODEL_DIR, &st) < 0 &&
		    stat(SKV_INSTALLED_MODEL_DIR, &st) == 0)
			dir = SKV_INSTALLED_MODEL_DIR;
#endif
		(void)st;
		snprintf(tok_path, sizeof(tok_path), "%s/stories260K.bin", dir);
		if (!realpath(tok_path, model_path))
			cached_die(1, "%s: %s", tok_path, strerror(errno));
		tok_path[0] = '\0';
	}
	d.model_path = model_path;
	int err = skv_model_open(d.model_path, &d.model, msg, sizeof(msg));
	if (err < 0)
		cached_die(1, "%s", msg);
	/* Engines need a tokenizer: the GGUF's own, --tokenizer, or tok<vocab>.bin beside. */
	if (o.tokenizer_path) {
		if (!realpath(o.tokenizer_path, tok_path))
			cached_die(1, "%s: %s", o.tokenizer_path, strerror(errno));
	} else if (!d.model->gguf) {
		char dir[PATH_MAX];
		snprintf(dir, sizeof(dir), "%s", model_path);
		const char *parent = dirname(dir);
		int n = snprintf(tok_path, sizeof(tok_path), "%s/tok%d.bin", parent,
				 d.model->cfg.vocab_size);
		if (n < (int)sizeof(tok_path) && access(tok_path, R_OK) < 0)
			n = snprintf(tok_path, sizeof(tok_path), "%s/tokenizer.bin", parent);
		if (n >= (int)sizeof(tok_path) || access(tok_path, R_OK) < 0)
			cached_die(1, "%s: no tokenizer next to the model; pass --tokenizer PATH",
				   model_path);
	}
	d.tokenizer_path = tok_path;
	d.engine_bin = o.engine_bin ? o.engine_bin : cached_find_engine_bin();
	d.engine_weights = o.engine_weights ? o.engine_weights : "auto";
	if (access(d.engine_bin, X_OK) < 0)
		cached_die(1, "%s: cannot run the engine executable: %s (use --engine-bin)",
			   d.engine_bin, strerror(errno));
	err = cached_pack_weights(&d);
	if (err < 0)
		cached_die(1, "cannot share the packed weights: %s", strerror(-err));

	/* Topology and placement: arenas per node, engines per core. */
	struct skv_topology *topo = NULL;
	struct skv_placement *plan = NULL;
	struct skv_placement_config pc = { .engines = o.engines > 0 ? (unsigned)o.engines : 0 };
	if (skv_placement_parse_numa(o.numa, &pc, msg, sizeof(msg)) < 0)
		cached_die(CACHED_EXIT_USAGE, "--numa: %s", msg);
	if (skv_topology_new(&topo, msg, sizeof(msg)) < 0)
		cached_die(CACHED_EXIT_USAGE, "%s", msg);
	pc.threads = (unsigned)o.engine_threads;
	if (!pc.threads) {
		/* auto: a big model's engines take every core of their node. */
		pc.threads = 1;
		if (skv_model_weight_bytes(d.model) >= CACHED_BIG_MODEL_BYTES)
			for (unsigned i = 0; i < skv_topology_node_count(topo); i++)
				if (skv_topology_node(topo, i)->n_cores > pc.threads)
					pc.threads = skv_topology_node(topo, i)->n_cores;
	}
	d.engine_threads = pc.threads;
	if (
	    skv_placement_plan(topo, &pc, &plan, msg, sizeof(msg)) < 0)
		cached_die(CACHED_EXIT_USAGE, "%s", msg);
	if (plan->n_arenas > CACHED_MAX_ARENAS || plan->n_engines > CACHED_MAX_ENGINES)
		cached_die(CACHED_EXIT_USAGE, "too many arenas or engines for this build");

	/* --tokens N sizes for whole default streams: their regions are what fills arenas, with
	 * the allocator's rounding to a size class counted in, so N tokens of them fit. */
	struct skv_policy def;
	uint64_t def_region, def_take;
	err = cached_default_stream(d.model, &def, &def_region, &def_take);
	if (err)
		cached_die(1, "the model's default stream has no valid KV layout: %s",
			   skv_strerror(err));
	uint64_t def_tokens = (uint64_t)(def.sink_slots + def.window_slots);
	uint64_t arena_bytes = (uint64_t)(o.arena_mb > 0 ? o.arena_mb : CACHED_DEFAULT_ARENA_MB)
			       << 20;
	if (o.token_budget > 0)
		arena_bytes = SKV_ARENA_HEADER_BLOCK +
			      ((uint64_t)o.token_budget + def_tokens - 1) / def_tokens * def_take;
	for (unsigned a = 0; a < plan->n_arenas; a++) {
		char name[32];
		snprintf(name, sizeof(name), "skv-arena-%u", a);
		struct skv_arena_config ac = { .bytes = arena_bytes, .huge = o.huge,
					       .node_os = plan->arenas[a].node_os, .topo = topo,
					       .prefault = o.prefault, .instance_id = d.instance,
					       .name = name };
		err = skv_arena_new(&ac, &d.arenas[a], msg, sizeof(msg));
		if (err < 0)
			cached_die(1, "%s", msg);
		d.arena_node[a] = plan->arenas[a].node_os;
		d.n_arenas++;
		cached_log("arena %u: %llu MiB, %s", a,
			   (unsigned long long)(skv_arena_info(d.arenas[a])->bytes >> 20),
			   skv_arena_info(d.arenas[a])->backing_desc);
		if (o.verbose) {
			struct skv_arena_heap_stats hs;
			skv_arena_heap_stats(skv_arena_heap(d.arenas[a]), &hs);
			cached_log("arena %u holds %llu default streams (%s, %lld sinks + %lld window "
				   "slots: %llu bytes of KV, %llu in the arena)", a,
				   (unsigned long long)(hs.heap_bytes / def_take),
				   skv_policy_name(def.kind), (long long)def.sink_slots,
				   (long long)def.window_slots, (unsigned long long)def_region,
				   (unsigned long long)def_take);
		}
	}
	if (d.max_streams || d.admission_queue || d.idle_timeout_s) {
		char limit[64] = "", queue[96] = "", idle[48] = "off";
		if (d.max_streams)
			snprintf(limit, sizeof(limit), ", at most %llu streams",
				 (unsigned long long)d.max_streams);
		if (d.admission_queue)
			snprintf(queue, sizeof(queue), " (up to %u OPENs wait up to %u s)",
				 d.queue_max, d.queue_timeout_s);
		if (d.idle_timeout_s)
			snprintf(idle, sizeof(idle), "%u s", d.idle_timeout_s);
		cached_log("admission: %s%s%s; idle time-out %s",
			   d.admission_queue ? "queue" : "reject", queue, limit, idle);
	}

	err = cached_listen(&d);
	if (err == -EADDRINUSE)
		cached_die(1, "%s: another skv-cached is already serving this socket", d.socket_path);
	if (err < 0)
		cached_die(1, "%s: cannot listen: %s", d.socket_path, strerror(-err));

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	d.signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	d.epfd = epoll_create1(EPOLL_CLOEXEC);
	if (d.signal_fd < 0 || d.epfd < 0 ||
	    cached_watch_fd(&d, d.listen_fd, CACHED_TAG_LISTEN, NULL) < 0 ||
	    cached_watch_fd(&d, d.signal_fd, CACHED_TAG_SIGNAL, NULL) < 0)
		cached_die(1, "cannot set up the event loop: %s", strerror(errno));

	char summary[256];
	skv_topology_summary(topo, summary, sizeof(summary));
	char types[64];
	skv_model_types(d.model, types, sizeof(types));
	cached_log("%s; serving %s (%s, %.1f MiB of weights) on %s with %u engine(s) of %u "
		   "thread(s)", summary, d.model_path, types,
		   (double)skv_model_weight_bytes(d.model) / (1 << 20), d.socket_path,
		   plan->n_engines, d.engine_threads);
	for (unsigned i = 0; i < plan->n_engines; i++) {
		struct cached_engine *e = &d.engines[d.n_engines];
		memset(e, 0, sizeof(*e));
		e->id = d.n_engines++;
		e->supervised = 1;
		e->arena = plan->engines[i].arena;
		e->node = plan->engines[i].node_os;
		e->pidfd = e->doorbell_fd = e->efd = -1;
		if (plan->engines[i].pu_os >= 0 &&
		    hwloc_bitmap_list_snprintf(e->cpus, sizeof(e->cpus), plan->engines[i].cpuset) >=
			    (int)sizeof(e->cpus))
			cached_die(1, "engine %u: its cpu list does not fit", e->id);
		if (cached_engine_prepare(e) < 0 || cached_spawn_engine(&d, e) < 0)
			cached_die(1, "cannot start engine %u: %s", e->id, strerror(errno));
	}
	skv_placement_free(plan);
	skv_topology_destroy(topo);

	int status = cached_run(&d);
	cached_shutdown(&d);
	return status;
}
