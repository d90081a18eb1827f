/* Helpers shared by the Criterion suites: where the shipped model and test data are, and
 * scratch files made at test time. Every helper asserts on failure (cr_assert), so a test never
 * goes on with a half-made fixture. */
#ifndef SKV_TESTUTIL_H
#define SKV_TESTUTIL_H

#include <stddef.h>

/* Absolute path of a file in the shipped model directory ($SKV_MODEL_DIR, set by meson test).
 * Returns a static buffer per call slot (up to 8 live results). */
const char *tu_model_path(const char *name);

/* Absolute path of a file under tests/data ($SKV_DATA_DIR). */
const char *tu_data_path(const char *name);

/* Read a whole file into a malloc'ed buffer (NUL-terminated; *len excludes the NUL). */
char *tu_read_file(const char *path, size_t *len);

/* A fresh private scratch directory for this test (mkdtemp under $TMPDIR or /tmp, with the pid
 * and test name in it), removed with its files by tu_scratch_cleanup(). */
const char *tu_scratch_dir(const char *test_name);
void tu_scratch_cleanup(void);

/* Write len bytes to <scratch>/<name>; returns the full path (static buffer slot). */
const char *tu_write_scratch(const char *name, const void *data, size_t len);

/* A MAP_SHARED memfd mapping of bytes, named after the pid and the test as real peers would
 * share one; it survives fork(). Asserts on failure. */
void *tu_map_shared(const char *test_name, size_t bytes);

#endif
