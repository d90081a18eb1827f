/* The KV arena's shared-memory header, and the validation every process does after mapping an
 * arena fd it was handed.
 *
 * An arena is one sealed memfd per NUMA node, created, sized and sealed by the daemon
 * (cached/arena.c) and mapped MAP_SHARED by the daemon and its engines. It holds the KV regions
 * of the streams (kv-layout.h) at base-relative offsets; no pointer is ever stored in it.
 *
 *   arena:  [struct skv_arena_hdr][zero up to SKV_ARENA_HEADER_BLOCK][heap ............]
 *   heap:   KV regions at SKV_ARENA_ALIGN-aligned offsets, handed out by the daemon's
 *           allocator, whose metadata is private to the daemon (nothing of it is shared)
 *
 * The header is written once by the daemon before the fd leaves the daemon and is never
 * written again (later ABI minors publish new offset-table entries the same way: before the fd
 * is sent). Readers copy it once (skv_arena_map_fd) and only trust the checked copy.
 *
 * Versioning: a different abi_major is refused. A newer abi_minor only fills reserved words,
 * unused offset-table slots and flag bits, so an older reader ignores them; `features` holds
 * bits a reader must understand, and a reader refuses bits it does not know.
 *
 * Thread safety: all functions touch only the objects passed in. */
#ifndef SKV_ARENA_H
#define SKV_ARENA_H

#include <stddef.h>
#include <stdint.h>

#include "kv-layout.h"

#define SKV_ARENA_MAGIC 0x41564b53u /* "SKVA" little-endian */
#define SKV_ARENA_ABI_MAJOR 1
#define SKV_ARENA_ABI_MINOR 0

/* Offsets of everything inside the arena are multiples of this: what a KV region needs. */
#define SKV_ARENA_ALIGN SKV_KV_ALIGN
/* The header owns the arena's first 4 KiB; tables and the heap start at or after it. */
#define SKV_ARENA_HEADER_BLOCK 4096u
/* node field of an arena that is not bound to a NUMA node. */
#define SKV_ARENA_NODE_NONE 0xffffffffu

/* backing: what the arena's pages are. */
#define SKV_ARENA_BACKING_PAGES 1u   /* ordinary shmem pages (THP if the kernel grants it) */
#define SKV_ARENA_BACKING_HUGETLB 2u /* explicit huge pages (hugetlbfs), page_bytes each */

/* flags: informational bits, set by the daemon at creation. */
#define SKV_ARENA_F_NODE_BOUND 0x1u  /* memory policy binds the pages to `node` */
#define SKV_ARENA_F_PREFAULTED 0x2u  /* every page was faulted in at creation */
#define SKV_ARENA_F_THP_ADVISED 0x4u /* MADV_HUGEPAGE was applied to the daemon's mapping */
#define SKV_ARENA_F_KNOWN 0x7u

/* features: bits a reader must understand to use the arena. None in ABI 1.0. */
#define SKV_ARENA_FEATURES_KNOWN 0x0u

/* Offset-table slots. An absent entry is all zero. */
#define SKV_ARENA_TABLE_HEAP 0    /* KV regions (required) */
#define SKV_ARENA_TABLE_STREAMS 1 /* stream table: planned, absent in 1.0 */
#define SKV_ARENA_TABLE_STATS 2   /* statistics snapshot: planned, absent in 1.0 */
#define SKV_ARENA_TABLE_SLOTS 8   /* 3..7 reserved for later minors */

struct skv_arena_extent {
	uint64_t offset; /* from the arena's start; a multiple of SKV_ARENA_ALIGN */
	uint64_t bytes;  /* 0: the entry is absent (offset is 0 too) */
};
_Static_assert(sizeof(struct skv_arena_extent) == 16, "skv_arena_extent is ABI");

/* Written only by the daemon, before the fd is shared; read-only for everyone after. */
struct skv_arena_hdr {
	uint32_t magic;        /* SKV_ARENA_MAGIC */
	uint16_t abi_major;    /* SKV_ARENA_ABI_MAJOR: a different major is refused */
	uint16_t abi_minor;    /* newer minors only fill reserved space */
	uint32_t header_bytes; /* sizeof(struct skv_arena_hdr) */
	uint32_t node;         /* NUMA node (the kernel's number) or SKV_ARENA_NODE_NONE */
	uint64_t arena_bytes;  /* size of the whole arena = size of the memfd */
	uint64_t page_bytes;   /* backing page size: the base page, or the huge page size */
	uint64_t instance_id;  /* random per daemon start: a changed id means a restarted daemon */
	uint32_t backing;      /* SKV_ARENA_BACKING_* */
	uint32_t flags;        /* SKV_ARENA_F_* */
	uint32_t features;     /* SKV_ARENA_FEATURES_KNOWN bits only */
	uint32_t reserved0;    /* zero */
	uint64_t reserved[9];  /* zero */
	struct skv_arena_extent table[SKV_ARENA_TABLE_SLOTS]; /* SKV_ARENA_TABLE_* */
};
_Static_assert(sizeof(struct skv_arena_hdr) == 256, "skv_arena_hdr is ABI");
_Static_assert(offsetof(struct skv_arena_hdr, arena_bytes) == 16, "skv_arena_hdr is ABI");
_Static_assert(offsetof(struct skv_arena_hdr, instance_id) == 32, "skv_arena_hdr is ABI");
_Static_assert(offsetof(struct skv_arena_hdr, backing) == 40, "skv_arena_hdr is ABI");
_Static_assert(offsetof(struct skv_arena_hdr, reserved) == 56, "skv_arena_hdr is ABI");
_Static_assert(offsetof(struct skv_arena_hdr, table) == 128, "skv_arena_hdr is ABI");
_Static_assert(sizeof(struct skv_arena_hdr) <= SKV_ARENA_HEADER_BLOCK, "header fits its block");
_Static_assert(SKV_ARENA_HEADER_BLOCK % SKV_ARENA_ALIGN == 0, "heap starts aligned");

/* What the reader knows about the fd it mapped, independently of the header's claims. */
struct skv_arena_file {
	uint64_t bytes;      /* fstat size */
	uint64_t page_bytes; /* st_blksize on hugetlbfs, the base page size otherwise */
	uint32_t hugetlb;    /* 1 if the fd lives on hugetlbfs */
	uint32_t sealed;     /* 1 if F_SEAL_GROW and F_SEAL_SHRINK are set */
};

/* A process's view of a mapped arena. */
struct skv_arena_view {
	void *base;               /* MAP_SHARED read-write mapping of the whole fd */
	uint64_t bytes;           /* mapped bytes = hdr.arena_bytes */
	struct skv_arena_hdr hdr; /* validated private copy: use this, never base's header */
};

/* Daemon only. Fill hdr for a new arena: the heap extent covers everything after
 * SKV_ARENA_HEADER_BLOCK, rounded down to SKV_ARENA_ALIGN. Returns 0, or -EINVAL when
 * arena_bytes is not a whole number of pages, page_bytes not a power of two >= 4096, backing or
 * flags unknown, or the arena has no room for a heap. */
int skv_arena_hdr_init(struct skv_arena_hdr *hdr, uint64_t arena_bytes, uint64_t page_bytes,
		       uint32_t backing, uint32_t flags, uint32_t node, uint64_t instance_id);

/* Validate a private copy of a header against the file it was read from. Returns 0,
 * -SKV_EFORMAT (bad magic, unknown backing or flags, reserved words set, a table entry that is
 * malformed), -SKV_EVERSION (other ABI major, unknown feature bits; msg names both versions) or
 * -SKV_ESHAPE (sizes disagree with the file: arena_bytes, header_bytes, page size, an extent
 * outside the arena, a file not sealed against resizing). msg (may be NULL) gets one line. */
int skv_arena_hdr_check(const struct skv_arena_hdr *hdr, const struct skv_arena_file *file,
			char *msg, size_t msg_len);

/* Any process. Map an arena fd (MAP_SHARED, read-write), copy its header once and validate it
 * with skv_arena_hdr_check against what fstat/fstatfs/F_GET_SEALS say about the fd. On success
 * fills out and returns 0; on failure nothing stays mapped, out is zeroed and the return is
 * -errno (fstat, mmap) or one of skv_arena_hdr_check's codes. The fd stays open and owned by
 * the caller. */
int skv_arena_map_fd(int fd, struct skv_arena_view *out, char *msg, size_t msg_len);

/* Unmap a view filled by skv_arena_map_fd. Accepts NULL and a zeroed view. */
void skv_arena_unmap(struct skv_arena_view *view);

/* Name of a backing value ("hugetlb", "pages", or "unknown"). */
const char *skv_arena_backing_name(uint32_t backing);

/* Pointer to bytes at offset inside a mapped view, or NULL when [offset, offset + bytes) is
 * not inside the mapping. Every offset read from shared memory goes through this. */
static inline void *skv_arena_at(const struct skv_arena_view *view, uint64_t offset,
				 uint64_t bytes)
{
	if (offset > view->bytes || bytes > view->bytes - offset)
		return NULL;
	return (char *)view->base + offset;
}

#endif
