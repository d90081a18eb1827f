#include "mapfile.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "skv-error.h"

int skv_map_file(const char *path, const char *what, const void **map, size_t *size, char *msg,
		 size_t msg_len)
{
	struct stat st;
	int err = 0;

	*map = NULL;
	*size = 0;
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
