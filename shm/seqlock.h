/* A seqlock over a run of uint64 words in shared memory: one writer, any number of readers in
 * other processes, readers never block the writer and detect a torn read by the sequence
 * number (odd while a write is in progress, changed if one happened during the read).
 *
 *   writer: seq = s + 1 (odd); release fence; store the words; seq = s + 2 (release)
 *   reader: s = seq (acquire); if odd retry; load the words; acquire fence; seq == s or retry
 * Words are stored and loaded with relaxed atomics, so a torn read is a detected retry, never
 * undefined behaviour. */
#ifndef SKV_SEQLOCK_H
#define SKV_SEQLOCK_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

static inline void skv_seqlock_write(uint64_t *seq, uint64_t *dst, const uint64_t *src, size_t n)
{
	uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
	__atomic_store_n(seq, s + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (size_t i = 0; i < n; i++)
		__atomic_store_n(&dst[i], src[i], __ATOMIC_RELAXED);
	__atomic_store_n(seq, s + 2, __ATOMIC_RELEASE);
}

/* 0, or -EAGAIN after max_tries torn reads. */
static inline int skv_seqlock_read(const uint64_t *seq, const uint64_t *src, uint64_t *dst,
				   size_t n, unsigned max_tries)
{
	for (unsigned t = 0; t < max_tries; t++) {
		uint64_t before = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
		if (before & 1)
			continue;
		for (size_t i = 0; i < n; i++)
			dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		if (__atomic_load_n(seq, __ATOMIC_RELAXED) == before)
			return 0;
	}
	return -EAGAIN;
}

#endif
