/* A stream's channel: the data path between one client and the engine serving the stream.
 *
 * A memfd created by the daemon, mapped by the client and by the engine (the daemon keeps only
 * a read-only view of the ring indices, for idle time-outs). Layout: struct skv_chan_hdr, then the input ring (client -> engine:
 * prompt text and commands), then the output ring (engine -> client: tokens, results), both
 * rings of struct skv_chan_msg (shm/ring.h).
 *
 * Wake-ups: the engine consumes the input rings of all its streams and sleeps on its own
 * doorbell (a one-page memfd holding its struct skv_wake_word, shared with its clients); a
 * client sleeps on the wake word of its client doorbell (below). Either side that waits for
 * room in a full ring sets its *_wants_room flag first, and the other side wakes it after it
 * frees a slot.
 *
 * Who writes what: in_ring head, client_wants_room, cancel: the client. in_ring tail, out_ring head,
 * engine_wants_room: the engine. out_ring tail and its wake word: the client. */
#ifndef SKV_CHANNEL_H
#define SKV_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#include "ring.h"

#define SKV_CHAN_MAGIC 0x4e414843u /* "CHAN" */
#define SKV_CHAN_ABI 1u
#define SKV_CHAN_RING_CAPACITY 1024
#define SKV_CHAN_DATA 40

struct skv_chan_hdr {
	uint32_t magic;
	uint32_t abi;
	uint64_t bytes;           /* whole channel */
	uint64_t in_offset;       /* input ring */
	uint64_t in_bytes;
	uint64_t out_offset;      /* output ring */
	uint64_t out_bytes;
	uint64_t stream_id;
	uint8_t pad0[SKV_CACHE_LINE - 56];
	uint32_t client_wants_room; /* client: set before it sleeps on a full input ring */
	uint32_t cancel;            /* client: bumped to cancel the request in progress */
	/* client: requests it sent (GENERATE/SCORE) and end events it read (DONE, SCORED,
	 * ERROR); a client that re-attaches to a resumable stream (proto.h, ATTACH) learns from
	 * their difference how many requests are still in progress. */
	uint32_t requests_sent;
	uint32_t requests_ended;
	uint8_t pad1[SKV_CACHE_LINE - 16];
	uint32_t engine_wants_room; /* engine: set while its output ring is full */
	uint8_t pad2[SKV_CACHE_LINE - 4];
};
_Static_assert(sizeof(struct skv_chan_hdr) == 3 * SKV_CACHE_LINE, "ABI");

enum skv_chan_type {
	/* client -> engine */
	SKV_CHAN_TEXT = 1,        /* data[0..n): prompt bytes, appended to the pending prompt */
	SKV_CHAN_GENERATE = 2,    /* end of prompt: arg = tokens to generate after it */
	SKV_CHAN_SCORE = 3,       /* end of text to score: arg = most predictions (0: all) */
	SKV_CHAN_RESET = 4,       /* drop the pending prompt bytes not yet ended by GENERATE or
				   * SCORE: the first message of a client that re-attaches, since
				   * the previous one may have died in the middle of a prompt */
	/* engine -> client */
	SKV_CHAN_TOKEN = 16,      /* arg = token id; data[0..n): its decoded bytes */
	SKV_CHAN_DONE = 17,       /* a GENERATE finished: arg = tokens generated, flags = reason,
				   * data[0..8) = the stream's tokens so far (u64; n = 8) */
	SKV_CHAN_SCORED = 18,     /* a SCORE finished: arg = predictions, data = double nll sum */
	SKV_CHAN_ERROR = 19,      /* the request failed: arg = -errno / -SKV_E*, data = text */
	SKV_CHAN_ECHO = 20,       /* the prompt's tokens as the engine decoded them (for echo) */
};

/* A client's doorbell: one sealed page per client connection, made by the daemon at HELLO and
 * mapped by the client and by every engine serving one of its streams. It holds the client's
 * wake word: the client sleeps on it (with its one eventfd) for all its streams at once, and an
 * engine rings it after writing any of them, so one wake-up system call serves all the streams
 * of a client that moved in a step. (The output ring's own wake word is unused.) */
#define SKV_CLIENT_DOORBELL_BYTES 4096u

/* Flags of TOKEN, ECHO and ERROR messages, whose bytes may span several messages. */
#define SKV_CHAN_CONTINUES 1u /* continues the previous message's bytes */
#define SKV_CHAN_MORE 2u      /* the next message continues this one's bytes */

/* Flags of a GENERATE request. */
#define SKV_GEN_IGNORE_BOS 1u /* do not stop at BOS: stream on (endless streams, benchmarks) */
#define SKV_GEN_SPECIAL 2u    /* special tokens written in the prompt are their ids (chat
                               * templates: skv_tokenizer_encode_special) */

#define SKV_DONE_LENGTH 0u  /* generated the requested number of tokens */
#define SKV_DONE_BOS 1u     /* the model produced BOS (llama2.c's end of story) */
#define SKV_DONE_CANCELLED 2u /* the client cancelled it (hdr->cancel) */
#define SKV_CHAN_DONE_MASK 3u /* DONE: flags & this is the reason */

struct skv_chan_msg {
	uint32_t type;
	uint32_t flags;
	uint32_t n;        /* bytes used in data */
	uint32_t epoch;    /* GENERATE/SCORE: hdr->cancel when sent; a later cancel stops it */
	uint64_t arg;
	uint8_t data[SKV_CHAN_DATA];
};
_Static_assert(sizeof(struct skv_chan_msg) == 64, "ABI");

/* An engine's doorbell: one page shared by the engine, its clients and the daemon. It holds the
 * engine's wake word (its clients ring it) and its statistics, which the engine publishes after
 * each step behind a seqlock (shm/seqlock.h) and the daemon reads for admin tools. */
#define SKV_DOORBELL_BYTES 4096u
#define SKV_DOORBELL_STATS_OFFSET 64u

/* Latency histograms: cumulative-free bucket counts with these upper bounds in seconds (the
 * last bucket is +Inf), plus the sum in nanoseconds, as Prometheus histograms need them. */
#define SKV_HIST_BUCKETS 16
#define SKV_HIST_BOUNDS_S                                                                  \
	{ 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, \
	  2.5, 5.0, 1e300 }

struct skv_hist {
	uint64_t bucket[SKV_HIST_BUCKETS]; /* observations <= bound[i] and > bound[i-1] */
	uint64_t count;
	uint64_t sum_ns;
};

struct skv_engine_stats {
	uint64_t seq;              /* seqlock over the words below */
	uint64_t steps;            /* forward passes run */
	uint64_t rows;             /* rows (tokens) through the model */
	uint64_t tokens_generated; /* tokens sampled for clients */
	uint64_t prompt_tokens;    /* prompt and scored tokens fed */
	uint64_t last_batch_rows;  /* rows of the latest step */
	uint64_t wake_syscalls;    /* wake-ups of clients that needed a system call */
	uint64_t streams;          /* streams it serves */
	struct skv_hist ttft;      /* request taken -> its first token emitted */
	struct skv_hist itl;       /* between consecutive tokens of a request */
	uint64_t reserved[8];
};
#define SKV_ENGINE_STATS_WORDS (7 + 2 * (SKV_HIST_BUCKETS + 2) + 8)
_Static_assert(sizeof(struct skv_engine_stats) == 8 * (1 + SKV_ENGINE_STATS_WORDS), "ABI");

static inline struct skv_engine_stats *skv_doorbell_stats(void *doorbell)
{
	return (struct skv_engine_stats *)((char *)doorbell + SKV_DOORBELL_STATS_OFFSET);
}

/* Bytes of a channel with the default ring capacity. */
size_t skv_chan_bytes(void);

/* Daemon: format a channel in mem (skv_chan_bytes() bytes). */
int skv_chan_init(void *mem, size_t bytes, uint64_t stream_id);

/* Either side: validate a mapped channel and attach its two rings, as the client
 * (producer of in, consumer of out) or as the engine (consumer of in, producer of out). */
struct skv_chan {
	struct skv_chan_hdr *hdr;
	struct skv_ring in, out;
	uint64_t stream_id;
};
int skv_chan_attach(struct skv_chan *c, void *mem, size_t mapped_bytes, int as_engine);

#endif
