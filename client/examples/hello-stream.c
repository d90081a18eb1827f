/* A libskv example: open a stream on a running skv-cached, send a prompt, print the answer as
 * it streams, then ask for more on the same stream (its cache keeps the conversation). README.md
 * shows this file as it is.
 *
 *   cc hello-stream.c $(pkg-config --cflags --libs libskv) -o hello-stream
 *   ./hello-stream [SOCKET] */
#include <stdio.h>
#include <string.h>
#include <skv-client.h>

static int print_token(skv_client_stream *s, const struct skv_client_event *ev, void *arg)
{
	(void)s;
	(void)arg;
	if (ev->type == SKV_CLIENT_EV_PROMPT || ev->type == SKV_CLIENT_EV_TOKEN)
		fwrite(ev->text, 1, ev->len, stdout);
	fflush(stdout);
	return 0; /* non-zero stops skv_client_stream_run */
}

int main(int argc, char **argv)
{
	char why[256];
	skv_client *c;
	skv_client_opts *o;
	skv_client_stream *s = NULL;
	int err = skv_client_connect(argc > 1 ? argv[1] : NULL, &c, why, sizeof(why));
	if (err < 0) {
		fprintf(stderr, "hello-stream: %s\n", why);
		return 1;
	}
	err = skv_client_opts_new(&o);
	if (!err)
		err = skv_client_opts_window(o, 256); /* 4 sinks (the default) + 256 recent tokens */
	if (!err)
		err = skv_client_stream_open(c, o, &s);
	skv_client_opts_free(o);
	const char *turns[] = { "Once upon a time", " The next day" };
	for (int i = 0; !err && i < 2; i++) {
		err = skv_client_stream_generate(s, turns[i], strlen(turns[i]), 40, 0);
		if (!err)
			err = skv_client_stream_run(s, print_token, NULL);
		putchar('\n');
	}
	if (err < 0)
		fprintf(stderr, "hello-stream: %s (%s)\n", skv_client_last_error(c), skv_strerror(err));
	skv_client_stream_close(s);
	skv_client_disconnect(c);
	return err < 0;
}
