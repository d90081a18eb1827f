#include "channel.h"

#include <errno.h>
#include <string.h>

#include "skv-error.h"

static size_t chan_ring_bytes(void)
{
	return skv_ring_bytes(sizeof(struct skv_chan_msg), SKV_CHAN_RING_CAPACITY);
}

size_t skv_chan_bytes(void)
{
	return sizeof(struct skv_chan_hdr) + 2 * chan_ring_bytes();
}

int skv_chan_init(void *mem, size_t bytes, uint64_t stream_id)
{
	size_t ring = chan_ring_bytes();
	if (bytes < skv_chan_bytes())
		return -EINVAL;
	memset(mem, 0, sizeof(struct skv_chan_hdr));
	struct skv_chan_hdr *h = mem;
	h->magic = SKV_CHAN_MAGIC;
	h->abi = SKV_CHAN_ABI;
	h->bytes = skv_chan_bytes();
	h->in_offset = sizeof(*h);
	h->in_bytes = ring;
	h->out_offset = sizeof(*h) + ring;
	h->out_bytes = ring;
	h->stream_id = stream_id;
	int err = skv_ring_init((char *)mem + h->in_offset, ring, sizeof(struct skv_chan_msg),
				SKV_CHAN_RING_CAPACITY);
	if (!err)
		err = skv_ring_init((char *)mem + h->out_offset, ring,
				    sizeof(struct skv_chan_msg), SKV_CHAN_RING_CAPACITY);
	return err;
}

int skv_chan_attach(struct skv_chan *c, void *mem, size_t mapped_bytes, int as_engine)
{
	struct skv_chan_hdr h;
	if (mapped_bytes < sizeof(h))
		return -SKV_ETRUNCATED;
	/* Copied once: the peer may change the shared header at any time. */
	memcpy(&h, mem, sizeof(h));
	if (h.magic != SKV_CHAN_MAGIC)
		return -SKV_EFORMAT;
	if (h.abi != SKV_CHAN_ABI)
		return -SKV_EVERSION;
	if (h.bytes > mapped_bytes || h.in_offset < sizeof(h) || h.out_offset < sizeof(h) ||
	    h.in_offset > h.bytes || h.in_bytes > h.bytes - h.in_offset ||
	    h.out_offset > h.bytes || h.out_bytes > h.bytes - h.out_offset ||
	    (h.in_offset < h.out_offset ? h.in_offset + h.in_bytes > h.out_offset
					: h.out_offset + h.out_bytes > h.in_offset) ||
	    h.in_offset % SKV_CACHE_LINE || h.out_offset % SKV_CACHE_LINE)
		return -SKV_ESHAPE;
	c->hdr = mem;
	c->stream_id = h.stream_id;
	int err = skv_ring_attach(&c->in, (char *)mem + h.in_offset, h.in_bytes,
				  as_engine ? SKV_RING_CONSUMER : SKV_RING_PRODUCER);
	if (!err)
		err = skv_ring_attach(&c->out, (char *)mem + h.out_offset, h.out_bytes,
				      as_engine ? SKV_RING_PRODUCER : SKV_RING_CONSUMER);
	if (!err && (c->in.elem_size != sizeof(struct skv_chan_msg) ||
		     c->out.elem_size != sizeof(struct skv_chan_msg)))
		err = -SKV_ESHAPE;
	return err;
}
