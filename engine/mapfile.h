/* Read-only memory mapping of a whole regular file, for the model and GGUF readers.
 *
 * Refuses directories (-EISDIR) and anything but regular files (-EINVAL: a FIFO is opened
 * without blocking and refused). An empty file gives *map == NULL and *size == 0 (mmap cannot map
 * zero bytes); the caller decides whether that is an error. msg gets "<path>: cannot open <what>:
 * <reason>"-style lines. Unmap with munmap(*map, *size).
 *
 * A file truncated by another process while mapped raises SIGBUS on access: model files are
 * expected to be immutable while served (a SKV_WEIGHTS_HUGE copy is immune). */
#ifndef SKV_MAPFILE_H
#define SKV_MAPFILE_H

#include <stddef.h>

int skv_map_file(const char *path, const char *what, const void **map, size_t *size, char *msg,
		 size_t msg_len);

/* Where a model's weights live in memory.
 *   SKV_WEIGHTS_MAP   the file's mapping (page cache, 4 KiB pages; shared by every process
 *                     that maps the file)
 *   SKV_WEIGHTS_HUGE  a private read-only copy in anonymous memory on 2 MiB transparent huge
 *                     pages (madvise): a decode step streams every weight, and on 4 KiB
 *                     pages the hardware prefetchers stop at every page boundary and every
 *                     page costs a TLB walk (measured: a 1B-shape Q4_0 decode on one core
 *                     1.4x faster on huge pages, tools/README.md); costs the file's size per
 *                     process
 *   SKV_WEIGHTS_AUTO  HUGE for files of SKV_WEIGHTS_HUGE_MIN bytes or more when the kernel's
 *                     transparent huge pages are not "never", else MAP; a HUGE copy that
 *                     cannot be made falls back to MAP */
enum skv_weights_mem { SKV_WEIGHTS_AUTO = 0, SKV_WEIGHTS_MAP, SKV_WEIGHTS_HUGE };
#define SKV_WEIGHTS_HUGE_MIN (64ull << 20)

/* "auto", "map", "huge" -> the mode; -EINVAL for anything else. */
int skv_weights_mem_parse(const char *name, enum skv_weights_mem *out);
const char *skv_weights_mem_name(enum skv_weights_mem mode);

/* skv_map_file with a choice of memory for the bytes (unmapped the same way: munmap(*map,
 * *size)). *used (may be NULL) says which one was made: SKV_WEIGHTS_MAP or _HUGE. */
int skv_map_file_mode(const char *path, const char *what, enum skv_weights_mem mode,
		      const void **map, size_t *size, enum skv_weights_mem *used, char *msg,
		      size_t msg_len);

#endif
