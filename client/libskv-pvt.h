/* libskv's insides that the project's own tests and tools may use (never installed): the
 * options as the wire carries them, so that tests can send values the public setters refuse. */
#ifndef SKV_LIBSKV_PVT_H
#define SKV_LIBSKV_PVT_H

#include "proto.h"
#include "skv-client.h"

struct skv_client_opts {
	struct skv_stream_params p;
	int resumable;                  /* skv_client_opts_resumable */
	char name[SKV_STREAM_NAME_MAX]; /* "": the daemon names it */
};

/* The client a stream belongs to. */
skv_client *libskv_stream_owner(const skv_client_stream *s);

/* The statistics of the engine serving s, as it publishes them in its doorbell page. */
struct skv_engine_stats;
const struct skv_engine_stats *libskv_stream_engine_stats(const skv_client_stream *s);

#endif
