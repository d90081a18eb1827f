/* The machine's NUMA nodes and cores (hwloc), and where the daemon puts its engines and arenas.
 *
 * A topology comes from this machine, from an hwloc synthetic description (tests, planning:
 * "pack:2 numa:1 l3:1 core:4 pu:2") or from an hwloc XML export (another machine). It lists
 * the NUMA nodes that have memory, each with its cores; a core is represented by the first
 * allowed PU (hardware thread) of the core, and that PU is what an engine is pinned to.
 *
 * Placement policy (skv_placement_plan), and why:
 *   - One arena per NUMA node that gets engines; every engine of a node uses that node's arena,
 *     so KV reads are node-local.
 *   - Each engine is one single-threaded process pinned to one core: on this project's models a
 *     second thread slows decoding down (ARCHITECTURE.md, "Threads"), so parallelism comes
 *     from more engines. The SMT siblings of that core are left to the daemon and the kernel.
 *   - Default engine count: one per core of every selected node, capped at max_engines in
 *     total (SKV_PLACEMENT_DEFAULT_MAX_ENGINES unless given). With threads = T > 1 (a big
 *     model: one core cannot saturate the memory bus), each engine gets T cores of one node
 *     (consecutive in the node's order) and the default count is one per T cores.
 *   - Engines are spread over the selected nodes as evenly as their cores allow (water-filling:
 *     counts differ by at most one between nodes with room); within a node, consecutive engines
 *     go to cores under different L3 caches first, so a few engines do not share one L3.
 *   - An explicit engine count may exceed the cores: the excess is spread evenly too and
 *     engines then share cores (placement->shared_cores says so).
 *   - An explicit node list (kernel node numbers, as numactl takes them) selects nodes; a node
 *     that does not exist, appears twice or has no cores is refused with a message.
 *   - numa off: one unbound arena, engines unpinned (cpuset = every allowed PU).
 *   - Nodes without cores (memory-only) are never selected by default.
 *
 * Thread safety: a topology is immutable after creation and may be read from any thread;
 * the bind helpers act on the calling thread or on the given memory only. */
#ifndef SKV_TOPOLOGY_H
#define SKV_TOPOLOGY_H

#include <hwloc.h>
#include <stddef.h>
#include <stdint.h>

#define SKV_TOPOLOGY_MAX_NODES 256
#define SKV_PLACEMENT_DEFAULT_MAX_ENGINES 64
#define SKV_PLACEMENT_MAX_ENGINES 1024

struct skv_topology;

struct skv_numa_node {
	unsigned os_index;          /* the kernel's node number (/sys/devices/system/node/nodeN) */
	uint64_t memory_bytes;      /* local memory of the node */
	unsigned n_cores;           /* cores with at least one allowed PU */
	const unsigned *core_pu;    /* n_cores entries: OS index of each core's first PU, in the
				     * order engines are given them (spread over L3 caches) */
	hwloc_const_cpuset_t cpuset; /* every allowed PU of the node */
};

/* Load this machine's topology. Returns 0 or -errno; msg gets one line on failure. */
int skv_topology_new(struct skv_topology **out, char *msg, size_t msg_len);
/* Load a synthetic topology (hwloc's synthetic syntax). -EINVAL for a malformed description. */
int skv_topology_new_synthetic(const char *description, struct skv_topology **out, char *msg,
			       size_t msg_len);
/* Load a topology exported by `lstopo file.xml` or hwloc_topology_export_xml. */
int skv_topology_new_xml(const char *path, struct skv_topology **out, char *msg,
			 size_t msg_len);
/* Accepts NULL and half-built topologies. */
void skv_topology_destroy(struct skv_topology *topo);

/* 1 if the topology describes the machine this process runs on (binding is possible). */
int skv_topology_is_this_system(const struct skv_topology *topo);
unsigned skv_topology_node_count(const struct skv_topology *topo);
/* Node i in the topology's order (0 <= i < node_count), or NULL. */
const struct skv_numa_node *skv_topology_node(const struct skv_topology *topo, unsigned i);
/* Node with the kernel's number os_index, or NULL. */
const struct skv_numa_node *skv_topology_node_by_os(const struct skv_topology *topo,
						    unsigned os_index);
/* Every allowed PU of the machine. */
hwloc_const_cpuset_t skv_topology_cpuset(const struct skv_topology *topo);
/* One line for the daemon's log: "2 NUMA nodes: node 0: 4 cores, 16.0 GiB; node 1: ...".
 * Returns the length snprintf would have written. */
int skv_topology_summary(const struct skv_topology *topo, char *buf, size_t len);

/* Bind the calling thread to cpuset (hwloc_set_cpubind, HWLOC_CPUBIND_THREAD). Returns 0,
 * -EOPNOTSUPP when the topology is not this machine, or -errno. */
int skv_topology_bind_thread(const struct skv_topology *topo, hwloc_const_cpuset_t cpuset);
/* Bind [addr, addr + len) to the NUMA node with kernel number node_os (HWLOC_MEMBIND_BIND, by
 * nodeset) before its pages are faulted in. Returns 0, -EOPNOTSUPP (not this machine), -ENOENT
 * (no such node), or -errno from the kernel (-ENOSYS: no NUMA support). */
int skv_topology_bind_memory(const struct skv_topology *topo, void *addr, size_t len,
			     unsigned node_os);

struct skv_placement_config {
	unsigned engines;     /* 0: one per `threads` cores of the selected nodes, capped at
			       * max_engines */
	unsigned threads;     /* cores each engine runs on (its matmul threads); 0 or 1: one */
	unsigned max_engines; /* cap of the default count; 0: SKV_PLACEMENT_DEFAULT_MAX_ENGINES */
	int numa_off;         /* one unbound arena, engines unpinned */
	unsigned n_nodes;     /* 0: every node with cores; else nodes[0..n_nodes) */
	unsigned nodes[SKV_TOPOLOGY_MAX_NODES]; /* kernel node numbers */
};

/* Parse a --numa value into cfg: "auto" or "all" (every node), "off", or a node list such as
 * "0,2-3". Leaves engines and max_engines alone. Returns 0 or -EINVAL with msg. */
int skv_placement_parse_numa(const char *spec, struct skv_placement_config *cfg, char *msg,
			     size_t msg_len);

struct skv_arena_place {
	int node_os;           /* kernel node number the arena binds to; -1 with numa off */
	unsigned n_engines;    /* engines using this arena */
	uint64_t memory_bytes; /* memory of the node (of the machine with numa off) */
};

struct skv_engine_place {
	unsigned arena;          /* index into placement->arenas */
	int node_os;             /* the arena's node, -1 with numa off */
	int pu_os;               /* OS index of the (first) PU it is pinned to; -1 when unpinned */
	hwloc_bitmap_t cpuset;   /* where it runs: its cores' first PUs, or every allowed PU
				  * when unpinned */
};

struct skv_placement {
	unsigned n_arenas;
	unsigned n_engines;
	int shared_cores;        /* 1 if some engines share a core (more engines than cores) */
	struct skv_arena_place *arenas;
	struct skv_engine_place *engines;
};

/* Plan arenas and engines (see the policy above). Returns 0, -EINVAL (with msg) for a node
 * that does not exist, is listed twice or has no cores, an engine count above
 * SKV_PLACEMENT_MAX_ENGINES, or numa off with a node list; -ENOMEM. */
int skv_placement_plan(const struct skv_topology *topo, const struct skv_placement_config *cfg,
		       struct skv_placement **out, char *msg, size_t msg_len);
/* Accepts NULL and half-built plans. */
void skv_placement_free(struct skv_placement *placement);

#endif
