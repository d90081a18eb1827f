/* Daemon side of the KV arenas: create and own one sealed memfd per NUMA node, and hand out
 * KV regions inside it.
 *
 * Creation (skv_arena_new), in this order:
 *   1. backing: explicit huge pages (memfd MFD_HUGETLB, the default huge page size) when the
 *      mode allows it and enough are available, else ordinary shmem pages with
 *      madvise(MADV_HUGEPAGE), which gives transparent huge pages only if
 *      /sys/kernel/mm/transparent_hugepage/shmem_enabled permits (the `enabled` knob governs
 *      anonymous memory, not memfds). The arena reports what it got (skv_arena_info).
 *   2. memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING [| MFD_NOEXEC_SEAL where the kernel knows
 *      it, >= 6.3] [| MFD_HUGETLB]), ftruncate to the size rounded up to whole pages, then
 *      F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL, so no process can change the size under
 *      another's mapping (readers verify the seals: skv_arena_map_fd). Sealing hugetlb memfds
 *      works since Linux 4.16 (checked on 6.18: the seals apply and ftruncate then fails with
 *      EPERM, as on shmem); on hugetlbfs a size that is not a whole number of huge pages is
 *      EINVAL, hence the rounding. Not F_SEAL_WRITE: engines write KV into the arena.
 *   3. mmap MAP_SHARED. For hugetlb this is where the kernel reserves the pages (ftruncate
 *      succeeds even with none free); a failed reservation is ENOMEM here, never a SIGBUS
 *      later.
 *   4. bind to the node (hwloc_set_area_membind, HWLOC_MEMBIND_BIND) before any page is
 *      faulted. shmem keeps the policy in the shared object, so pages faulted later by engines
 *      follow it too; hugetlb faults follow the policy of the faulting mapping only and the
 *      pool's reservation is not per node, so a node-bound hugetlb arena is always prefaulted
 *      by the daemon (it costs no extra memory: the pages are reserved anyway).
 *   5. prefault (optional, forced as above) with MADV_POPULATE_WRITE, which reports a failure
 *      as an error instead of a SIGBUS; the header's page is always populated that way.
 *   6. write the header (shm/arena.h): heap extent, backing, page size, node, instance id.
 *
 * Huge page modes: auto (huge pages if enough are available, else the fallback, with the
 * reason in the description), on (fail with a message saying how to reserve them), off.
 *
 * The allocator (skv_arena_heap) is daemon-private metadata: nothing of it is in shared
 * memory. See cached/arena.c for its design.
 *
 * Thread safety: none; an arena and its heap belong to the daemon's main loop. */
#ifndef SKV_CACHED_ARENA_H
#define SKV_CACHED_ARENA_H

#include <stddef.h>
#include <stdint.h>

/* shm/arena.h has the same name as this header: name it by path so that the quoted include
 * does not find this file again. */
#include "../shm/arena.h"

struct skv_topology;

enum skv_huge_mode {
	SKV_HUGE_AUTO,
	SKV_HUGE_ON,
	SKV_HUGE_OFF,
};

/* "auto", "on", "off" -> mode. Returns 0 or -EINVAL. */
int skv_huge_mode_parse(const char *text, enum skv_huge_mode *out);
const char *skv_huge_mode_name(enum skv_huge_mode mode);

/* The default huge page size's pool, from /proc/meminfo and /sys/kernel/mm/hugepages. */
struct skv_hugepages {
	uint64_t page_bytes;      /* default huge page size; 0: the kernel has no hugetlb */
	uint64_t total_pages;     /* nr_hugepages */
	uint64_t free_pages;      /* free_hugepages (includes reserved ones) */
	uint64_t resv_pages;      /* reserved by mappings but not yet faulted */
	uint64_t overcommit_pages; /* surplus pages that may still be allocated on demand */
	int node_os;              /* node asked about, -1 for none or when it has no pool file */
	uint64_t node_total_pages; /* that node's nr_hugepages */
	uint64_t node_free_pages; /* that node's free_hugepages */
	uint64_t available_pages; /* what a new arena may take */
};

/* Query the pool; node_os >= 0 also limits available_pages to that node's free pages.
 * Returns 0 (page_bytes 0 when there is no hugetlb support) or -errno. */
int skv_hugepages_query(int node_os, struct skv_hugepages *out);

/* A random non-zero 64-bit id, drawn once per daemon start (getrandom). */
uint64_t skv_arena_instance_id_new(void);

struct skv_arena_config {
	uint64_t bytes;                  /* wanted size; rounded up to whole pages */
	enum skv_huge_mode huge;
	int node_os;                     /* NUMA node (kernel number) to bind to; -1: none */
	const struct skv_topology *topo; /* this machine's topology; required when node_os >= 0 */
	int prefault;                    /* fault every page in at creation */
	uint64_t instance_id;            /* the daemon's id; 0: draw one */
	const char *name;                /* memfd name (shows in /proc/PID/fd); NULL: "skv-arena" */
};

struct skv_arena_info {
	uint32_t backing;         /* SKV_ARENA_BACKING_* that the arena got */
	uint32_t flags;           /* SKV_ARENA_F_* */
	uint64_t bytes;           /* arena size after rounding */
	uint64_t page_bytes;      /* backing page size */
	int node_os;              /* node the header names, -1 for none */
	uint64_t instance_id;
	char backing_desc[512];   /* e.g. "hugetlb: 64 pages of 2 MiB, node 0, prefaulted" */
};

struct skv_arena;

/* Daemon only. Create an arena (see the order above). Returns 0, -EINVAL (bad size, node or
 * mode), -ENOMEM (mode on and no huge pages, or no memory), or -errno from the kernel; msg
 * (may be NULL) gets one line a user can act on. */
int skv_arena_new(const struct skv_arena_config *cfg, struct skv_arena **out, char *msg,
		  size_t msg_len);
/* Unmap and close. Engines' mappings stay valid until they unmap. Accepts NULL. */
void skv_arena_destroy(struct skv_arena *arena);

int skv_arena_fd(const struct skv_arena *arena);       /* to send with SCM_RIGHTS */
void *skv_arena_base(const struct skv_arena *arena);   /* the daemon's mapping */
const struct skv_arena_info *skv_arena_info(const struct skv_arena *arena);
struct skv_arena_heap *skv_arena_heap(struct skv_arena *arena);

/* Allocate / free a KV region in the arena's heap: arena-relative offsets. */
int64_t skv_arena_alloc(struct skv_arena *arena, uint64_t bytes);
int skv_arena_free(struct skv_arena *arena, uint64_t offset);

/* ---- the allocator ------------------------------------------------------------------- */

/* Size classes: 64-byte granules; 64..256 bytes one class per granule, then 4 classes per
 * power of two (1.25, 1.5, 1.75, 2 x 2^k). A request is rounded up to its class, so the waste
 * is below 20% of what is handed out. Class 163 is 2^48 bytes, the largest heap. */
#define SKV_ARENA_HEAP_CLASSES 164
#define SKV_ARENA_HEAP_MAX_BYTES (1ull << 48)

/* Class of a request of bytes (1 <= bytes <= SKV_ARENA_HEAP_MAX_BYTES), or
 * SKV_ARENA_HEAP_CLASSES when out of range. */
unsigned skv_arena_class_of(uint64_t bytes);
/* Bytes of class cls, or 0 when out of range. */
uint64_t skv_arena_class_bytes(unsigned cls);

struct skv_arena_heap_stats {
	uint64_t heap_bytes;      /* managed bytes */
	uint64_t used_bytes;      /* bytes handed out (class sizes) */
	uint64_t requested_bytes; /* bytes asked for by live allocations */
	uint64_t free_bytes;      /* heap_bytes - used_bytes */
	uint64_t largest_free;    /* largest free extent */
	uint64_t free_extents;    /* number of free extents */
	uint64_t live_allocs;
	uint64_t failed_allocs;   /* -ENOMEM answers so far */
	uint64_t class_live[SKV_ARENA_HEAP_CLASSES];  /* live allocations per request class */
	uint64_t class_free[SKV_ARENA_HEAP_CLASSES];  /* free extents per list (largest class
						       * that fits in the extent) */
};

struct skv_arena_heap;

/* An allocator for [offset, offset + bytes) (offset and bytes multiples of SKV_ARENA_ALIGN;
 * bytes <= SKV_ARENA_HEAP_MAX_BYTES). It never touches that memory. Returns 0, -EINVAL,
 * -ENOMEM. */
int skv_arena_heap_new(uint64_t offset, uint64_t bytes, struct skv_arena_heap **out);
void skv_arena_heap_destroy(struct skv_arena_heap *heap);

/* Offset of a new region of at least bytes, aligned to SKV_ARENA_ALIGN; -EINVAL for 0 bytes,
 * -ENOMEM when no free extent is large enough (the heap is unchanged). */
int64_t skv_arena_heap_alloc(struct skv_arena_heap *heap, uint64_t bytes);
/* Free the region at offset. -EINVAL if offset is not a live allocation (double free). */
int skv_arena_heap_free(struct skv_arena_heap *heap, uint64_t offset);
/* Bytes handed out for the live allocation at offset, or 0 if there is none. */
uint64_t skv_arena_heap_size_of(const struct skv_arena_heap *heap, uint64_t offset);
void skv_arena_heap_stats(const struct skv_arena_heap *heap, struct skv_arena_heap_stats *out);
/* Verify every internal invariant (for tests and admin): 0, or -EFAULT with msg. */
int skv_arena_heap_check(const struct skv_arena_heap *heap, char *msg, size_t msg_len);

#endif
