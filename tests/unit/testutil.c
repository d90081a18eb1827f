#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char tu_slots[8][PATH_MAX];
static unsigned tu_next_slot;
static char tu_scratch[PATH_MAX];

static char *tu_slot(void)
{
	return tu_slots[tu_next_slot++ % 8];
}

static const char *tu_join_env(const char *var, const char *name)
{
	const char *dir = getenv(var);
	cr_assert(dir != NULL, "%s is not set: run the tests through `meson test`", var);
	char *out = tu_slot();
	int n = snprintf(out, PATH_MAX, "%s/%s", dir, name);
	cr_assert(n > 0 && n < PATH_MAX);
	return out;
}

const char *tu_model_path(const char *name)
{
	return tu_join_env("SKV_MODEL_DIR", name);
}

const char *tu_data_path(const char *name)
{
	return tu_join_env("SKV_DATA_DIR", name);
}

char *tu_read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	cr_assert(f != NULL, "cannot open %s", path);
	cr_assert(fseek(f, 0, SEEK_END) == 0);
	long size = ftell(f);
	cr_assert(size >= 0);
	rewind(f);
	char *buf = malloc((size_t)size + 1);
	cr_assert(buf != NULL);
	cr_assert(fread(buf, 1, (size_t)size, f) == (size_t)size, "short read of %s", path);
	fclose(f);
	buf[size] = '\0';
	if (len)
		*len = (size_t)size;
	return buf;
}

const char *tu_scratch_dir(const char *test_name)
{
	if (tu_scratch[0])
		return tu_scratch;
	const char *tmp = getenv("TMPDIR");
	int n = snprintf(tu_scratch, sizeof(tu_scratch), "%s/skv-%d-%s-XXXXXX",
			 tmp ? tmp : "/tmp", (int)getpid(), test_name);
	cr_assert(n > 0 && n < (int)sizeof(tu_scratch), "scratch path too long");
	cr_assert(mkdtemp(tu_scratch) != NULL, "mkdtemp %s failed", tu_scratch);
	return tu_scratch;
}

void tu_scratch_cleanup(void)
{
	if (!tu_scratch[0])
		return;
	DIR *d = opendir(tu_scratch);
	if (d) {
		struct dirent *e;
		char path[PATH_MAX];
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			if (snprintf(path, sizeof(path), "%s/%s", tu_scratch, e->d_name) <
			    (int)sizeof(path))
				unlink(path);
		}
		closedir(d);
	}
	rmdir(tu_scratch);
	tu_scratch[0] = '\0';
}

const char *tu_write_scratch(const char *name, const void *data, size_t len)
{
	const char *dir = tu_scratch_dir("scratch");
	char *path = tu_slot();
	int n = snprintf(path, PATH_MAX, "%s/%s", dir, name);
	cr_assert(n > 0 && n < PATH_MAX, "scratch path too long");
	FILE *f = fopen(path, "wb");
	cr_assert(f != NULL, "cannot create %s", path);
	cr_assert(fwrite(data, 1, len, f) == len);
	cr_assert(fclose(f) == 0);
	return path;
}

void *tu_map_shared(const char *test_name, size_t bytes)
{
	char name[128];
	snprintf(name, sizeof(name), "skv-test-%d-%s", (int)getpid(), test_name);
	int fd = memfd_create(name, MFD_CLOEXEC);
	cr_assert(fd >= 0, "memfd_create: %s", strerror(errno));
	cr_assert_eq(ftruncate(fd, (off_t)bytes), 0);
	void *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	cr_assert(mem != MAP_FAILED, "mmap: %s", strerror(errno));
	close(fd);
	return mem;
}
