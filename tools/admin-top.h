/* skv-admin top: a live view of the daemon (like top or varnishstat). A header with the
 * server's summary, then the streams table, refreshed every interval seconds; q quits (also
 * Ctrl-C). When stdout is not a terminal (a pipe, a file) it runs in batch mode, as top -b:
 * frames as plain text separated by a blank line, one frame unless iterations says more.
 *
 * The daemon may go away and come back while top runs: top keeps its last figures on screen,
 * says since when the daemon is unreachable, reconnects at every refresh, and names a restart
 * (a new instance id in HELLO_OK) in one header line. */
#ifndef SKV_ADMIN_TOP_H
#define SKV_ADMIN_TOP_H

#include "admin-conn.h"
#include "admin-report.h"

/* c is connected; top takes it over (and disconnects it). iterations: frames to show before
 * returning (0: until q, or 1 in batch mode). Returns the exit status: 0, or 1 with one line on
 * stderr. */
int admin_top_run(struct admin_conn *c, const char *socket_path, double interval_s,
		  long iterations, const struct admin_sort *sort);

#endif
