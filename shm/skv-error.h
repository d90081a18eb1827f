/* streamkv error codes.
 *
 * Every function of the project returns >= 0 on success or a negative code: either -errno
 * (e.g. -ENOENT, -ENOMEM) or one of the project codes below, which live in one reserved range
 * above the kernel's errno values (MAX_ERRNO is 4095). skv_strerror() names both kinds.
 * Functions that can fail for a reason a user must read also fill a caller-provided message
 * buffer (`char *msg, size_t msg_len`): one line, no trailing newline, naming the file or input
 * and the fault. Libraries never print; the caller that handles an error logs it once.
 *
 * Thread safety: all functions here are thread-safe and async-signal-unsafe only in that
 * skv_errorf uses vsnprintf. */
#ifndef SKV_ERROR_H
#define SKV_ERROR_H

#include <stddef.h>

#define SKV_ERRNO_BASE 5000

enum skv_errno {
	SKV_EFORMAT = SKV_ERRNO_BASE, /* file or message is malformed (wrong magic, bad field) */
	SKV_ETRUNCATED,               /* file or message ends before its declared contents */
	SKV_EVERSION,                 /* unsupported format, ABI or protocol version */
	SKV_EDTYPE,                   /* unsupported tensor or element type */
	SKV_ESHAPE,                   /* dimensions disagree with each other or with the data size */
	SKV_EVOCAB,                   /* tokenizer vocabulary does not match the model */
	SKV_ECACHEFULL,               /* a stream's KV cache has no room (dense limit reached) */
	SKV_EINVAL_POLICY,            /* policy parameters are inconsistent */
	SKV_EBACKEND,                 /* the compute backend (oneDNN) failed */
	SKV_ERESTORED,                /* a stream's engine died and the stream was restored from
				       * its snapshot: attach to it again to continue */
	SKV_ERRNO_END
};

/* Text for a negative return value: -errno or -SKV_E*. Never NULL. */
const char *skv_strerror(int err);

/* Format a one-line message into msg (may be NULL) and return err unchanged, so that
 * `return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: bad magic", path);` reads naturally. */
int skv_errorf(char *msg, size_t msg_len, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

#endif
