#include "arena.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "skv-error.h"

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

static int arena_is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

const char *skv_arena_backing_name(uint32_t backing)
{
	switch (backing) {
	case SKV_ARENA_BACKING_PAGES:
		return "pages";
	case SKV_ARENA_BACKING_HUGETLB:
		return "hugetlb";
	default:
		return "unknown";
	}
}

int skv_arena_hdr_init(struct skv_arena_hdr *hdr, uint64_t arena_bytes, uint64_t page_bytes,
		       uint32_t backing, uint32_t flags, uint32_t node, uint64_t instance_id)
{
	if (!arena_is_pow2(page_bytes) || page_bytes < 4096 || arena_bytes % page_bytes)
		return -EINVAL;
	if ((backing != SKV_ARENA_BACKING_PAGES && backing != SKV_ARENA_BACKING_HUGETLB) ||
	    (flags & ~SKV_ARENA_F_KNOWN))
		return -EINVAL;
	uint64_t heap_bytes = arena_bytes > SKV_ARENA_HEADER_BLOCK
				      ? (arena_bytes - SKV_ARENA_HEADER_BLOCK) / SKV_ARENA_ALIGN *
						SKV_ARENA_ALIGN
				      : 0;
	if (!heap_bytes)
		return -EINVAL;

	memset(hdr, 0, sizeof(*hdr));
	hdr->magic = SKV_ARENA_MAGIC;
	hdr->abi_major = SKV_ARENA_ABI_MAJOR;
	hdr->abi_minor = SKV_ARENA_ABI_MINOR;
	hdr->header_bytes = sizeof(*hdr);
	hdr->node = node;
	hdr->arena_bytes = arena_bytes;
	hdr->page_bytes = page_bytes;
	hdr->instance_id = instance_id;
	hdr->backing = backing;
	hdr->flags = flags;
	hdr->table[SKV_ARENA_TABLE_HEAP].offset = SKV_ARENA_HEADER_BLOCK;
	hdr->table[SKV_ARENA_TABLE_HEAP].bytes = heap_bytes;
	return 0;
}

static int arena_check_reserved(const struct skv_arena_hdr *hdr, char *msg, size_t msg_len)
{
	/* Reserved space is zero in every header of our minor or older; a newer minor may use
	 * it for fields this build ignores. */
	if (hdr->abi_minor > SKV_ARENA_ABI_MINOR)
		return 0;
	if (hdr->flags & ~SKV_ARENA_F_KNOWN)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "arena header: unknown flags 0x%x",
				  hdr->flags & ~SKV_ARENA_F_KNOWN);
	int nonzero = hdr->reserved0 != 0;
	for (size_t i = 0; i < sizeof(hdr->reserved) / sizeof(hdr->reserved[0]); i++)
		nonzero |= hdr->reserved[i] != 0;
	for (unsigned i = SKV_ARENA_TABLE_STATS + 1; i < SKV_ARENA_TABLE_SLOTS; i++)
		nonzero |= (hdr->table[i].offset | hdr->table[i].bytes) != 0;
	if (nonzero)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "arena header: reserved words are not zero (ABI %u.%u)",
				  hdr->abi_major, hdr->abi_minor);
	return 0;
}

int skv_arena_hdr_check(const struct skv_arena_hdr *hdr, const struct skv_arena_file *file,
			char *msg, size_t msg_len)
{
	if (hdr->magic != SKV_ARENA_MAGIC)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "arena header: bad magic 0x%08x (expected 0x%08x): not a streamkv arena",
				  hdr->magic, SKV_ARENA_MAGIC);
	if (hdr->abi_major != SKV_ARENA_ABI_MAJOR)
		return skv_errorf(msg, msg_len, -SKV_EVERSION,
				  "arena header: ABI %u.%u, this build speaks %u.%u: run a daemon and "
				  "engines of the same release",
				  hdr->abi_major, hdr->abi_minor, SKV_ARENA_ABI_MAJOR,
				  SKV_ARENA_ABI_MINOR);
	if (hdr->features & ~SKV_ARENA_FEATURES_KNOWN)
		return skv_errorf(msg, msg_len, -SKV_EVERSION,
				  "arena header: ABI %u.%u needs features 0x%x that this build (%u.%u) "
				  "does not know",
				  hdr->abi_major, hdr->abi_minor,
				  hdr->features & ~SKV_ARENA_FEATURES_KNOWN, SKV_ARENA_ABI_MAJOR,
				  SKV_ARENA_ABI_MINOR);
	if (hdr->header_bytes != sizeof(*hdr))
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "arena header: claims %u header bytes, ABI %u has %zu",
				  hdr->header_bytes, SKV_ARENA_ABI_MAJOR, sizeof(*hdr));
	int err = arena_check_reserved(hdr, msg, msg_len);
	if (err < 0)
		return err;
	if (hdr->backing != SKV_ARENA_BACKING_PAGES && hdr->backing != SKV_ARENA_BACKING_HUGETLB)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "arena header: unknown backing %u",
				  hdr->backing);

	/* Sizes: the file is the truth, the header only a claim about it. */
	if (!file->sealed)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "arena fd is not sealed against resizing (F_SEAL_GROW|F_SEAL_SHRINK)");
	if (hdr->arena_bytes != file->bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "arena header: claims %llu bytes, the fd holds %llu",
				  (unsigned long long)hdr->arena_bytes,
				  (unsigned long long)file->bytes);
	if ((hdr->backing == SKV_ARENA_BACKING_HUGETLB) != (file->hugetlb != 0))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "arena header: claims %s backing, the fd is %son hugetlbfs",
				  skv_arena_backing_name(hdr->backing), file->hugetlb ? "" : "not ");
	if (hdr->page_bytes != file->page_bytes || hdr->arena_bytes % hdr->page_bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "arena header: page size %llu disagrees with the fd's %llu or with "
				  "its %llu bytes",
				  (unsigned long long)hdr->page_bytes,
				  (unsigned long long)file->page_bytes,
				  (unsigned long long)hdr->arena_bytes);

	for (unsigned i = 0; i < SKV_ARENA_TABLE_SLOTS; i++) {
		const struct skv_arena_extent *e = &hdr->table[i];
		if (!e->bytes) {
			if (e->offset)
				return skv_errorf(msg, msg_len, -SKV_EFORMAT,
						  "arena table[%u]: offset %llu without bytes", i,
						  (unsigned long long)e->offset);
			continue;
		}
		if (e->offset % SKV_ARENA_ALIGN)
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "arena table[%u]: offset %llu is not %u-byte aligned", i,
					  (unsigned long long)e->offset, SKV_ARENA_ALIGN);
		if (e->offset < SKV_ARENA_HEADER_BLOCK || e->offset > hdr->arena_bytes ||
		    e->bytes > hdr->arena_bytes - e->offset)
			return skv_errorf(msg, msg_len, -SKV_ESHAPE,
					  "arena table[%u]: extent [%llu, +%llu) lies outside the "
					  "arena's %llu bytes",
					  i, (unsigned long long)e->offset,
					  (unsigned long long)e->bytes,
					  (unsigned long long)hdr->arena_bytes);
	}
	if (!hdr->table[SKV_ARENA_TABLE_HEAP].bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE, "arena header: no heap");
	return 0;
}

static int arena_file_facts(int fd, struct skv_arena_file *file)
{
	struct stat st;
	struct statfs sfs;
	if (fstat(fd, &st) < 0 || fstatfs(fd, &sfs) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode) || st.st_size < 0)
		return -EINVAL;
	memset(file, 0, sizeof(*file));
	file->bytes = (uint64_t)st.st_size;
	file->hugetlb = (unsigned long)sfs.f_type == (unsigned long)HUGETLBFS_MAGIC;
	/* hugetlbfs reports its page size as the block size. */
	file->page_bytes = file->hugetlb ? (uint64_t)st.st_blksize
					 : (uint64_t)sysconf(_SC_PAGESIZE);
	int seals = fcntl(fd, F_GET_SEALS);
	file->sealed = seals >= 0 && (seals & (F_SEAL_GROW | F_SEAL_SHRINK)) ==
					     (F_SEAL_GROW | F_SEAL_SHRINK);
	return 0;
}

int skv_arena_map_fd(int fd, struct skv_arena_view *out, char *msg, size_t msg_len)
{
	memset(out, 0, sizeof(*out));
	struct skv_arena_file file;
	int err = arena_file_facts(fd, &file);
	if (err < 0)
		return skv_errorf(msg, msg_len, err, "arena fd %d: %s", fd, skv_strerror(err));
	if (file.bytes < SKV_ARENA_HEADER_BLOCK || file.bytes > SIZE_MAX)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "arena fd %d: %llu bytes cannot hold an arena", fd,
				  (unsigned long long)file.bytes);

	void *base = mmap(NULL, (size_t)file.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED) {
		err = -errno;
		return skv_errorf(msg, msg_len, err, "arena fd %d: mmap of %llu bytes: %s", fd,
				  (unsigned long long)file.bytes, skv_strerror(err));
	}
	/* One copy, then only the copy is checked and used (a peer may write the shared one). */
	struct skv_arena_hdr hdr;
	memcpy(&hdr, base, sizeof(hdr));
	err = skv_arena_hdr_check(&hdr, &file, msg, msg_len);
	if (err < 0) {
		munmap(base, (size_t)file.bytes);
		return err;
	}
	out->base = base;
	out->bytes = file.bytes;
	out->hdr = hdr;
	return 0;
}

void skv_arena_unmap(struct skv_arena_view *view)
{
	if (!view)
		return;
	if (view->base)
		munmap(view->base, (size_t)view->bytes);
	memset(view, 0, sizeof(*view));
}
