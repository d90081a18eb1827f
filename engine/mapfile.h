/* Read-only memory mapping of a whole regular file, for the model and GGUF readers.
 *
 * Refuses directories (-EISDIR) and anything but regular files (-EINVAL: a FIFO is opened
 * without blocking and refused). An empty file gives *map == NULL and *size == 0 (mmap cannot map
 * zero bytes); the caller decides whether that is an error. msg gets "<path>: cannot open <what>:
 * <reason>"-style lines. Unmap with munmap(*map, *size).
 *
 * A file truncated by another process while mapped raises SIGBUS on access: model files are
 * expected to be immutable while served. */
#ifndef SKV_MAPFILE_H
#define SKV_MAPFILE_H

#include <stddef.h>

int skv_map_file(const char *path, const char *what, const void **map, size_t *size, char *msg,
		 size_t msg_len);

#endif
