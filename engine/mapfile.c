#include "mapfile.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "skv-error.h"

#define MAP_HUGE_ALIGN (2ull << 20)

int skv_weights_mem_parse(const char *name, enum skv_weights_mem *out)
{
	if (!name)
		return -EINVAL;
	if (!strcmp(name, "auto"))
		*out = SKV_WEIGHTS_AUTO;
	else if (!strcmp(name, "map"))
		*out = SKV_WEIGHTS_MAP;
	else if (!strcmp(name, "huge"))
		*out = SKV_WEIGHTS_HUGE;
	else
		return -EINVAL;
	return 0;
}

const char *skv_weights_mem_name(enum skv_weights_mem mode)
{
	return mode == SKV_WEIGHTS_HUGE ? "huge" : mode == SKV_WEIGHTS_MAP ? "map" : "auto";
}

/* Transparent huge pages can back an madvise'd anonymous mapping unless they are "[never]". */
static int map_thp_available(void)
{
	char buf[128] = "";
	int fd = open("/sys/kernel/mm/transparent_hugepage/enabled", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 && !strstr(buf, "[never]");
}

/* A private copy of the file's size bytes in anonymous memory, 2 MiB-aligned, huge pages
 * advised before the first touch, read-only once filled. */
static int map_huge_copy(int fd, const char *path, const char *what, size_t size, void **out,
			 char *msg, size_t msg_len)
{
	size_t len = (size + 4095) & ~(size_t)4095;
	char *raw = mmap(NULL, len + MAP_HUGE_ALIGN, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		int err = -errno;
		return skv_errorf(msg, msg_len, err, "%s: no memory for a copy of the %s: %s", path,
				  what, skv_strerror(err));
	}
	char *p = (char *)(((uintptr_t)raw + MAP_HUGE_ALIGN - 1) & ~(uintptr_t)(MAP_HUGE_ALIGN - 1));
	/* Keep exactly [p, p + len), so that munmap(p, size) releases all of it. */
	if (p > raw)
		munmap(raw, (size_t)(p - raw));
	if (raw + len + MAP_HUGE_ALIGN > p + len)
		munmap(p + len, (size_t)(raw + len + MAP_HUGE_ALIGN - (p + len)));
	(void)madvise(p, len, MADV_HUGEPAGE);
	for (size_t off = 0; off < size;) {
		ssize_t n = pread(fd, p + off, size - off, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int err = n < 0 ? -errno : -SKV_ETRUNCATED;
			munmap(p, len);
			return skv_errorf(msg, msg_len, err, "%s: cannot read the %s: %s", path, what,
					  n < 0 ? skv_strerror(err) : "it shrank while read");
		}
		off += (size_t)n;
	}
	if (mprotect(p, len, PROT_READ) < 0) {
		int err = -errno;
		munmap(p, len);
		return skv_errorf(msg, msg_len, err, "%s: cannot protect the copy of the %s: %s",
				  path, what, skv_strerror(err));
	}
	*out = p;
	return 0;
}

int skv_map_file(const char *path, const char *what, const void **map, size_t *size, char *msg,
		 size_t msg_len)
{
	return skv_map_file_mode(path, what, SKV_WEIGHTS_MAP, map, size, NULL, msg, msg_len);
}

int skv_map_file_mode(const char *path, const char *what, enum skv_weights_mem mode,
		      const void **map, size_t *size, enum skv_weights_mem *used, char *msg,
		      size_t msg_len)
{
	struct stat st;
	int err = 0;

	*map = NULL;
	*size = 0;
	if (used)
		*used = SKV_WEIGHTS_MAP;
	/* O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below. */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		err = -errno;
		return skv_errorf(msg, msg_len, err, "%s: cannot open %s: %s", path, what,
				  skv_strerror(err));
	}
	if (fstat(fd, &st) < 0) {
		err = -errno;
		skv_errorf(msg, msg_len, err, "%s: cannot stat %s: %s", path, what,
			   skv_strerror(err));
		goto out_close;
	}
	if (S_ISDIR(st.st_mode)) {
		err = skv_errorf(msg, msg_len, -EISDIR, "%s: is a directory, not a %s", path, what);
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		err = skv_errorf(msg, msg_len, -EINVAL, "%s: not a regular file", path);
		goto out_close;
	}
	int asked = mode;
	if (mode == SKV_WEIGHTS_AUTO)
		mode = (uint64_t)st.st_size >= SKV_WEIGHTS_HUGE_MIN && map_thp_available()
			       ? SKV_WEIGHTS_HUGE
			       : SKV_WEIGHTS_MAP;
	if (st.st_size && mode == SKV_WEIGHTS_HUGE) {
		void *p = NULL;
		err = map_huge_copy(fd, path, what, (size_t)st.st_size, &p, msg, msg_len);
		if (!err) {
			*map = p;
			*size = (size_t)st.st_size;
			if (used)
				*used = SKV_WEIGHTS_HUGE;
			goto out_close;
		}
		if (asked != SKV_WEIGHTS_AUTO)
			goto out_close;
		err = 0; /* auto: the file's mapping instead */
		if (msg_len)
			msg[0] = '\0';
	}
	if (st.st_size) {
		void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) {
			err = -errno;
			skv_errorf(msg, msg_len, err, "%s: cannot map %s: %s", path, what,
				   skv_strerror(err));
			goto out_close;
		}
		*map = p;
		*size = (size_t)st.st_size;
	}
out_close:
	close(fd);
	return err;
}
