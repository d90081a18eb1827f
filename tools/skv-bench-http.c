/* skv-bench-http: many streaming requests through skv-http, measured from the client side, for
 * comparison with skv-bench (libskv directly) on the same daemon.
 *
 *   skv-bench-http [--url URL] (--streams N | --sweep N1,N2,...) --tokens T [--repeats R]
 *                  [--prompt TEXT] [--api-key KEY] [--gateway-pid PID] [--json]
 *
 * One run: N POST /v1/completions requests with "stream": true, greedy, "ignore_eos": true and
 * max_tokens T (what skv-bench asks of libskv: T tokens, not stopping at BOS), all added to one
 * libcurl multi handle at the same moment and driven by curl_multi_poll in this one thread.
 * Every SSE event whose finish_reason is null is a token.
 *
 * Reported per N (medians of --repeats runs for the rate; percentiles over all requests of all
 * runs): aggregate tokens/s (tokens over the wall time from the first request to the last
 * [DONE]), time to first token (request added -> its first token event), inter-token latency
 * (gaps between a request's consecutive token events as this process reads them), and with
 * --gateway-pid the CPU time skv-http used over the runs, in cores. */
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "bench-util.h"

#define BH_MAX_RUNS 32
#define BH_MAX_STREAMS 4096

struct bh_opts {
	const char *url;
	const char *prompt;
	const char *api_key;
	long long streams[BH_MAX_RUNS];
	size_t n_runs;
	long long tokens;
	int repeats;
	int gateway_pid;
	int json;
};

struct bh_req {
	CURL *h;
	double t_sent, t_first, t_last;
	long long tokens;
	int done;
	char line[8192];           /* the SSE line being received */
	size_t line_len;
	double *gaps;              /* [tokens] seconds between token events */
	size_t n_gaps;
};

static void bh_usage(FILE *out)
{
	fputs("usage: skv-bench-http [--url URL] (--streams N | --sweep N1,N2,...) --tokens T\n"
	      "                      [--repeats R] [--prompt TEXT] [--api-key KEY]\n"
	      "                      [--gateway-pid PID] [--json]\n"
	      "  --url URL          skv-http (default http://127.0.0.1:8080)\n"
	      "  --streams N        N concurrent streaming requests (default 1)\n"
	      "  --sweep LIST       run each N in turn, one row each\n"
	      "  --tokens T         tokens per request (default 256)\n"
	      "  --repeats R        runs per N (default 3; the rate is their median)\n"
	      "  --prompt TEXT      the prompt (default \"Once upon a time\", as skv-bench)\n"
	      "  --api-key KEY      sent as Authorization: Bearer KEY\n"
	      "  --gateway-pid PID  report skv-http's CPU time over the runs\n"
	      "  --json             one JSON array instead of the table\n",
	      out);
}

/* One SSE line: a token event, the last event, or anything else. */
static void bh_line(struct bh_req *r, const char *line, size_t len)
{
	if (len < 6 || memcmp(line, "data: ", 6))
		return;
	double now = bench_now();
	if (len >= 12 && !memcmp(line + 6, "[DONE]", 6)) {
		r->done = 1;
		r->t_last = now;
		return;
	}
	if (!memmem(line, len, "\"finish_reason\":null", 20))
		return;
	if (r->tokens == 0)
		r->t_first = now;
	else if (r->n_gaps < (size_t)r->tokens + 1)
		r->gaps[r->n_gaps++] = now - r->t_last;
	r->t_last = now;
	r->tokens++;
}

static size_t bh_write(char *data, size_t size, size_t nmemb, void *arg)
{
	struct bh_req *r = arg;
	size_t n = size * nmemb;
	for (size_t i = 0; i < n; i++) {
		char c = data[i];
		if (c == '\n') {
			bh_line(r, r->line, r->line_len);
			r->line_len = 0;
		} else if (r->line_len < sizeof(r->line)) {
			r->line[r->line_len++] = c;
		}
	}
	return n;
}

struct bh_result {
	long long streams;
	double tokens_per_s;
	double ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms;
	double gateway_cores;
	long long lost;            /* requests that did not end with [DONE] and T tokens */
};

/* One run of n requests; appends TTFTs and gaps to the pools. Returns tokens/s. */
static double bh_run(const struct bh_opts *o, long long n, double *ttft, size_t *n_ttft,
		     double **gaps, size_t *n_gaps, size_t *gaps_cap, long long *lost)
{
	char url[1024], body[2048];
	snprintf(url, sizeof(url), "%s/v1/completions", o->url);
	snprintf(body, sizeof(body),
		 "{\"prompt\":\"%s\",\"max_tokens\":%lld,\"temperature\":0,\"ignore_eos\":true,"
		 "\"stream\":true}",
		 o->prompt, o->tokens);
	struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
	char auth[512];
	if (o->api_key) {
		snprintf(auth, sizeof(auth), "Authorization: Bearer %s", o->api_key);
		hdr = curl_slist_append(hdr, auth);
	}
	CURLM *m = curl_multi_init();
	struct bh_req *reqs = calloc((size_t)n, sizeof(*reqs));
	if (!m || !reqs)
		bench_die("out of memory");
	double t0 = bench_now();
	for (long long i = 0; i < n; i++) {
		struct bh_req *r = &reqs[i];
		r->gaps = malloc(sizeof(double) * (size_t)(o->tokens + 1));
		r->h = curl_easy_init();
		if (!r->gaps || !r->h)
			bench_die("out of memory");
		curl_easy_setopt(r->h, CURLOPT_URL, url);
		curl_easy_setopt(r->h, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(r->h, CURLOPT_HTTPHEADER, hdr);
		curl_easy_setopt(r->h, CURLOPT_WRITEFUNCTION, bh_write);
		curl_easy_setopt(r->h, CURLOPT_WRITEDATA, r);
		curl_easy_setopt(r->h, CURLOPT_TCP_NODELAY, 1L);
		r->t_sent = bench_now();
		curl_multi_add_handle(m, r->h);
	}
	int running = 1;
	while (running) {
		CURLMcode mc = curl_multi_perform(m, &running);
		if (mc != CURLM_OK)
			bench_die("curl_multi_perform: %s", curl_multi_strerror(mc));
		if (running && (mc = curl_multi_poll(m, NULL, 0, 1000, NULL)) != CURLM_OK)
			bench_die("curl_multi_poll: %s", curl_multi_strerror(mc));
	}
	double t_end = t0;
	for (long long i = 0; i < n; i++) {
		struct bh_req *r = &reqs[i];
		long code = 0;
		curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &code);
		if (!r->done || r->tokens != o->tokens || code != 200)
			(*lost)++;
		if (r->t_last > t_end)
			t_end = r->t_last;
		if (r->tokens)
			ttft[(*n_ttft)++] = r->t_first - r->t_sent;
		if (*n_gaps + r->n_gaps > *gaps_cap) {
			*gaps_cap = (*n_gaps + r->n_gaps) * 2;
			*gaps = realloc(*gaps, sizeof(double) * *gaps_cap);
			if (!*gaps)
				bench_die("out of memory");
		}
		memcpy(*gaps + *n_gaps, r->gaps, sizeof(double) * r->n_gaps);
		*n_gaps += r->n_gaps;
		curl_multi_remove_handle(m, r->h);
		curl_easy_cleanup(r->h);
		free(r->gaps);
	}
	long long total = 0;
	for (long long i = 0; i < n; i++)
		total += reqs[i].tokens;
	free(reqs);
	curl_multi_cleanup(m);
	curl_slist_free_all(hdr);
	return t_end > t0 ? (double)total / (t_end - t0) : 0.0;
}

static struct bh_result bh_measure(const struct bh_opts *o, long long n)
{
	struct bh_result res = { .streams = n };
	double rates[64];
	double *ttft = malloc(sizeof(double) * (size_t)(n * o->repeats));
	size_t n_ttft = 0, n_gaps = 0, gaps_cap = 0;
	double *gaps = NULL;
	double cpu0 = o->gateway_pid ? bench_proc_cpu_s(o->gateway_pid) : 0, t0 = bench_now();
	for (int k = 0; k < o->repeats; k++)
		rates[k] = bh_run(o, n, ttft, &n_ttft, &gaps, &n_gaps, &gaps_cap, &res.lost);
	if (o->gateway_pid)
		res.gateway_cores = (bench_proc_cpu_s(o->gateway_pid) - cpu0) / (bench_now() - t0);
	res.tokens_per_s = bench_median(rates, (size_t)o->repeats);
	qsort(ttft, n_ttft, sizeof(double), bench_cmp_double);
	qsort(gaps, n_gaps, sizeof(double), bench_cmp_double);
	res.ttft_p50_ms = bench_pct(ttft, n_ttft, 50) * 1e3;
	res.ttft_p99_ms = bench_pct(ttft, n_ttft, 99) * 1e3;
	res.itl_p50_ms = bench_pct(gaps, n_gaps, 50) * 1e3;
	res.itl_p99_ms = bench_pct(gaps, n_gaps, 99) * 1e3;
	free(ttft);
	free(gaps);
	return res;
}

int main(int argc, char **argv)
{
	struct bh_opts o = { .url = "http://127.0.0.1:8080", .prompt = "Once upon a time",
			     .streams = { 1 }, .n_runs = 1, .tokens = 256, .repeats = 3 };
	static const struct option longs[] = {
		{ "url", required_argument, NULL, 'u' },
		{ "streams", required_argument, NULL, 'n' },
		{ "sweep", required_argument, NULL, 's' },
		{ "tokens", required_argument, NULL, 't' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "prompt", required_argument, NULL, 'P' },
		{ "api-key", required_argument, NULL, 'k' },
		{ "gateway-pid", required_argument, NULL, 'g' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longs, NULL)) != -1) {
		switch (c) {
		case 'u': o.url = optarg; break;
		case 'n':
			o.streams[0] = bench_parse_int("--streams", optarg, 1, BH_MAX_STREAMS);
			o.n_runs = 1;
			break;
		case 's':
			o.n_runs = bench_parse_list("--sweep", optarg, 1, BH_MAX_STREAMS, o.streams,
						    BH_MAX_RUNS);
			break;
		case 't': o.tokens = bench_parse_int("--tokens", optarg, 1, 1000000); break;
		case 'r': o.repeats = (int)bench_parse_int("--repeats", optarg, 1, 64); break;
		case 'P':
			if (strpbrk(optarg, "\"\\") || strlen(optarg) > 1024)
				bench_die("--prompt: up to 1024 bytes without quotes or backslashes");
			o.prompt = optarg;
			break;
		case 'k': o.api_key = optarg; break;
		case 'g': o.gateway_pid = (int)bench_parse_int("--gateway-pid", optarg, 1, 1 << 22);
			break;
		case 'j': o.json = 1; break;
		case 'h': bh_usage(stdout); return 0;
		case ':': bench_die("%s needs a value", argv[optind - 1]);
		default: bench_die("unknown flag '%s' (see skv-bench-http --help)", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s'", argv[optind]);
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (curl_global_init(CURL_GLOBAL_DEFAULT))
		bench_die("curl_global_init failed");
	if (o.json)
		fputs("[", stdout);
	else
		printf("streams tokens/s  ttft p50/p99 ms  itl p50/p99 ms%s lost\n",
		       o.gateway_pid ? "  gateway cpu" : "");
	for (size_t i = 0; i < o.n_runs; i++) {
		struct bh_result r = bh_measure(&o, o.streams[i]);
		if (o.json) {
			printf("%s{\"streams\":%lld,\"tokens_per_s\":%.1f,\"ttft_p50_ms\":%.3f,"
			       "\"ttft_p99_ms\":%.3f,\"itl_p50_ms\":%.3f,\"itl_p99_ms\":%.3f,"
			       "\"gateway_cores\":%.3f,\"lost\":%lld}",
			       i ? "," : "", r.streams, r.tokens_per_s, r.ttft_p50_ms, r.ttft_p99_ms,
			       r.itl_p50_ms, r.itl_p99_ms, r.gateway_cores, r.lost);
		} else {
			printf("%7lld %8.0f  %7.2f/%7.2f  %6.3f/%6.2f", r.streams, r.tokens_per_s,
			       r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms);
			if (o.gateway_pid)
				printf("  %11.2f", r.gateway_cores);
			printf(" %4lld\n", r.lost);
		}
		fflush(stdout);
	}
	if (o.json)
		puts("]");
	curl_global_cleanup();
	return 0;
}
