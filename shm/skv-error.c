#include "skv-error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const char *const skv_error_text[SKV_ERRNO_END - SKV_ERRNO_BASE] = {
	[SKV_EFORMAT - SKV_ERRNO_BASE] = "malformed file or message",
	[SKV_ETRUNCATED - SKV_ERRNO_BASE] = "truncated file or message",
	[SKV_EVERSION - SKV_ERRNO_BASE] = "unsupported version",
	[SKV_EDTYPE - SKV_ERRNO_BASE] = "unsupported data type",
	[SKV_ESHAPE - SKV_ERRNO_BASE] = "dimensions do not match the data",
	[SKV_EVOCAB - SKV_ERRNO_BASE] = "tokenizer vocabulary does not match the model",
	[SKV_ECACHEFULL - SKV_ERRNO_BASE] = "KV cache is full",
	[SKV_EINVAL_POLICY - SKV_ERRNO_BASE] = "invalid cache policy parameters",
	[SKV_EBACKEND - SKV_ERRNO_BASE] = "compute backend failure",
	[SKV_ERESTORED - SKV_ERRNO_BASE] = "stream restored from its snapshot: attach again",
};

const char *skv_strerror(int err)
{
	int code = err < 0 ? -err : err;

	if (code >= SKV_ERRNO_BASE && code < SKV_ERRNO_END)
		return skv_error_text[code - SKV_ERRNO_BASE];
	if (code == 0)
		return "success";
	/* strerror() is not thread-safe in theory; glibc's table is static and fine in practice,
	 * but strerrordesc_np() is the documented thread-safe accessor. */
	const char *text = strerrordesc_np(code);
	return text ? text : "unknown error";
}

int skv_errorf(char *msg, size_t msg_len, int err, const char *fmt, ...)
{
	if (msg && msg_len) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(msg, msg_len, fmt, ap);
		va_end(ap);
	}
	return err;
}
