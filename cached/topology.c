#include "topology.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "skv-error.h"

struct topo_node {
	struct skv_numa_node pub;
	hwloc_obj_t obj;
	unsigned *core_pu;
	hwloc_bitmap_t cpuset;
};

struct skv_topology {
	hwloc_topology_t hw;
	int this_system;
	int synthetic;
	unsigned n_nodes;
	struct topo_node *nodes;
	hwloc_bitmap_t cpuset;
};

void skv_topology_destroy(struct skv_topology *topo)
{
	if (!topo)
		return;
	for (unsigned i = 0; i < topo->n_nodes; i++) {
		free(topo->nodes[i].core_pu);
		hwloc_bitmap_free(topo->nodes[i].cpuset);
	}
	free(topo->nodes);
	hwloc_bitmap_free(topo->cpuset);
	if (topo->hw)
		hwloc_topology_destroy(topo->hw);
	free(topo);
}

/* The NUMA node a core takes its memory from: the first NUMA node attached to the nearest
 * ancestor that has memory children. A node attached at the same place after it (HBM, CXL
 * expanders) shares the cpuset in hwloc but gets no cores here, so that every core belongs to
 * exactly one node and memory-only nodes stay out of the default placement. */
static hwloc_obj_t topo_core_home(hwloc_obj_t core)
{
	for (hwloc_obj_t up = core->parent; up; up = up->parent) {
		if (!up->memory_arity)
			continue;
		hwloc_obj_t mem = up->memory_first_child;
		while (mem && mem->type != HWLOC_OBJ_NUMANODE)
			mem = mem->memory_first_child; /* through memory-side caches */
		if (mem)
			return mem;
	}
	return NULL;
}

struct topo_core {
	unsigned rank;  /* position of the core among the cores of its L3 */
	unsigned group; /* which L3 of the node, in order of first appearance */
	unsigned pu;
};

static int topo_core_cmp(const void *a, const void *b)
{
	const struct topo_core *x = a, *y = b;
	if (x->rank != y->rank)
		return x->rank < y->rank ? -1 : 1;
	if (x->group != y->group)
		return x->group < y->group ? -1 : 1;
	return 0;
}

/* Collect the cores of node, ordered so that consecutive engines land under different L3
 * caches (round-robin over the node's L3s, hwloc's order inside each). */
static int topo_collect_cores(struct skv_topology *topo, struct topo_node *node)
{
	hwloc_topology_t hw = topo->hw;
	hwloc_obj_type_t unit = hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_CORE) > 0 ? HWLOC_OBJ_CORE
										 : HWLOC_OBJ_PU;
	int n_units = hwloc_get_nbobjs_by_type(hw, unit);
	if (n_units <= 0)
		return 0;
	struct topo_core *cores = calloc((size_t)n_units, sizeof(*cores));
	hwloc_obj_t *groups = calloc((size_t)n_units, sizeof(*groups));
	unsigned *group_size = calloc((size_t)n_units, sizeof(*group_size));
	node->cpuset = hwloc_bitmap_alloc();
	if (!cores || !groups || !group_size || !node->cpuset)
		goto nomem;

	unsigned n = 0, n_groups = 0;
	for (int i = 0; i < n_units; i++) {
		hwloc_obj_t core = hwloc_get_obj_by_type(hw, unit, (unsigned)i);
		if (!core || topo_core_home(core) != node->obj)
			continue;
		hwloc_obj_t pu = unit == HWLOC_OBJ_PU
					 ? core
					 : hwloc_get_next_obj_inside_cpuset_by_type(
						   hw, core->cpuset, HWLOC_OBJ_PU, NULL);
		if (!pu)
			continue;
		hwloc_obj_t l3 = hwloc_get_ancestor_obj_by_type(hw, HWLOC_OBJ_L3CACHE, core);
		unsigned g = 0;
		while (g < n_groups && groups[g] != l3)
			g++;
		if (g == n_groups)
			groups[n_groups++] = l3;
		cores[n] = (struct topo_core){ .rank = group_size[g]++, .group = g,
					       .pu = pu->os_index };
		hwloc_bitmap_or(node->cpuset, node->cpuset, core->cpuset);
		n++;
	}
	qsort(cores, n, sizeof(*cores), topo_core_cmp);
	node->core_pu = calloc(n ? n : 1, sizeof(*node->core_pu));
	if (!node->core_pu)
		goto nomem;
	for (unsigned i = 0; i < n; i++)
		node->core_pu[i] = cores[i].pu;
	node->pub.n_cores = n;
	free(cores);
	free(groups);
	free(group_size);
	return 0;
nomem:
	free(cores);
	free(groups);
	free(group_size);
	return -ENOMEM;
}

static int topo_finish(struct skv_topology *topo, char *msg, size_t msg_len)
{
	hwloc_topology_t hw = topo->hw;
	if (hwloc_topology_load(hw) < 0) {
		int err = -errno;
		return skv_errorf(msg, msg_len, err ? err : -EINVAL, "hwloc: cannot load topology: %s",
				  skv_strerror(err ? err : -EINVAL));
	}
	topo->this_system = hwloc_topology_is_thissystem(hw);
	topo->cpuset = hwloc_bitmap_dup(hwloc_topology_get_allowed_cpuset(hw));
	int n = hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_NUMANODE);
	if (!topo->cpuset)
		return skv_errorf(msg, msg_len, -ENOMEM, "topology: out of memory");
	if (n <= 0 || n > SKV_TOPOLOGY_MAX_NODES)
		return skv_errorf(msg, msg_len, -EINVAL,
				  "topology: %d NUMA nodes (this build handles 1 to %d)", n,
				  SKV_TOPOLOGY_MAX_NODES);
	topo->nodes = calloc((size_t)n, sizeof(*topo->nodes));
	if (!topo->nodes)
		return skv_errorf(msg, msg_len, -ENOMEM, "topology: out of memory");
	for (int i = 0; i < n; i++) {
		struct topo_node *node = &topo->nodes[i];
		node->obj = hwloc_get_obj_by_type(hw, HWLOC_OBJ_NUMANODE, (unsigned)i);
		topo->n_nodes = (unsigned)i + 1;
		if (topo_collect_cores(topo, node) < 0)
			return skv_errorf(msg, msg_len, -ENOMEM, "topology: out of memory");
		node->pub.os_index = node->obj->os_index;
		node->pub.memory_bytes = node->obj->attr->numanode.local_memory;
		node->pub.core_pu = node->core_pu;
		node->pub.cpuset = node->cpuset;
	}
	return 0;
}

static int topo_start(struct skv_topology **out, struct skv_topology **topo, char *msg,
		      size_t msg_len)
{
	*out = NULL;
	*topo = calloc(1, sizeof(**topo));
	if (!*topo)
		return skv_errorf(msg, msg_len, -ENOMEM, "topology: out of memory");
	if (hwloc_topology_init(&(*topo)->hw) < 0) {
		(*topo)->hw = NULL;
		return skv_errorf(msg, msg_len, -ENOMEM, "hwloc: cannot initialise a topology");
	}
	return 0;
}

static int topo_done(int err, struct skv_topology *topo, struct skv_topology **out)
{
	if (err < 0) {
		skv_topology_destroy(topo);
		return err;
	}
	*out = topo;
	return 0;
}

int skv_topology_new(struct skv_topology **out, char *msg, size_t msg_len)
{
	struct skv_topology *topo;
	int err = topo_start(out, &topo, msg, msg_len);
	if (err == 0)
		err = topo_finish(topo, msg, msg_len);
	return topo_done(err, topo, out);
}

int skv_topology_new_synthetic(const char *description, struct skv_topology **out, char *msg,
			       size_t msg_len)
{
	struct skv_topology *topo;
	int err = topo_start(out, &topo, msg, msg_len);
	if (err == 0 && hwloc_topology_set_synthetic(topo->hw, description) < 0)
		err = skv_errorf(msg, msg_len, -EINVAL,
				 "synthetic topology \"%s\" is malformed (hwloc syntax, e.g. "
				 "\"pack:2 numa:1 core:4 pu:2\")",
				 description);
	if (err == 0) {
		topo->synthetic = 1;
		err = topo_finish(topo, msg, msg_len);
	}
	return topo_done(err, topo, out);
}

int skv_topology_new_xml(const char *path, struct skv_topology **out, char *msg, size_t msg_len)
{
	struct skv_topology *topo;
	int err = topo_start(out, &topo, msg, msg_len);
	if (err == 0 && access(path, R_OK) < 0) {
		err = -errno;
		err = skv_errorf(msg, msg_len, err, "%s: %s", path, skv_strerror(err));
	}
	if (err == 0 && hwloc_topology_set_xml(topo->hw, path) < 0) {
		err = errno ? -errno : -EINVAL;
		err = skv_errorf(msg, msg_len, err, "%s: hwloc cannot use it as XML: %s", path,
				 skv_strerror(err));
	}
	if (err == 0 && topo_finish(topo, msg, msg_len) < 0)
		err = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				 "%s: not a usable hwloc XML topology (export one with `lstopo "
				 "file.xml`)",
				 path);
	return topo_done(err, topo, out);
}

int skv_topology_is_this_system(const struct skv_topology *topo)
{
	return topo->this_system;
}

unsigned skv_topology_node_count(const struct skv_topology *topo)
{
	return topo->n_nodes;
}

const struct skv_numa_node *skv_topology_node(const struct skv_topology *topo, unsigned i)
{
	return i < topo->n_nodes ? &topo->nodes[i].pub : NULL;
}

static int topo_index_of_os(const struct skv_topology *topo, unsigned os_index)
{
	for (unsigned i = 0; i < topo->n_nodes; i++)
		if (topo->nodes[i].pub.os_index == os_index)
			return (int)i;
	return -1;
}

const struct skv_numa_node *skv_topology_node_by_os(const struct skv_topology *topo,
						    unsigned os_index)
{
	int i = topo_index_of_os(topo, os_index);
	return i < 0 ? NULL : &topo->nodes[i].pub;
}

hwloc_const_cpuset_t skv_topology_cpuset(const struct skv_topology *topo)
{
	return topo->cpuset;
}

int skv_topology_summary(const struct skv_topology *topo, char *buf, size_t len)
{
	size_t used = 0;
	int n = snprintf(buf, len, "%u NUMA node%s%s:", topo->n_nodes, topo->n_nodes == 1 ? "" : "s",
			 topo->synthetic ? " (synthetic)" : topo->this_system ? "" : " (XML)");
	for (unsigned i = 0; n >= 0 && i < topo->n_nodes; i++) {
		used += (size_t)n;
		const struct skv_numa_node *node = &topo->nodes[i].pub;
		n = snprintf(used < len ? buf + used : NULL, used < len ? len - used : 0,
			     "%s node %u: %u cores, %.1f GiB", i ? ";" : "", node->os_index,
			     node->n_cores, (double)node->memory_bytes / (1024.0 * 1024 * 1024));
	}
	return n < 0 ? n : (int)(used + (size_t)n);
}

int skv_topology_bind_thread(const struct skv_topology *topo, hwloc_const_cpuset_t cpuset)
{
	if (!topo->this_system)
		return -EOPNOTSUPP;
	if (hwloc_set_cpubind(topo->hw, cpuset, HWLOC_CPUBIND_THREAD) < 0)
		return errno ? -errno : -EINVAL;
	return 0;
}

int skv_topology_bind_memory(const struct skv_topology *topo, void *addr, size_t len,
			     unsigned node_os)
{
	if (!topo->this_system)
		return -EOPNOTSUPP;
	if (topo_index_of_os(topo, node_os) < 0)
		return -ENOENT;
	hwloc_bitmap_t nodeset = hwloc_bitmap_alloc();
	if (!nodeset)
		return -ENOMEM;
	int err = 0;
	if (hwloc_bitmap_only(nodeset, node_os) < 0)
		err = -ENOMEM;
	else if (hwloc_set_area_membind(topo->hw, addr, len, nodeset, HWLOC_MEMBIND_BIND,
					HWLOC_MEMBIND_BYNODESET) < 0)
		err = errno ? -errno : -EINVAL;
	hwloc_bitmap_free(nodeset);
	return err;
}

/* --numa values: "auto"/"all", "off", or a list of node numbers and ranges. */
int skv_placement_parse_numa(const char *spec, struct skv_placement_config *cfg, char *msg,
			     size_t msg_len)
{
	if (!strcmp(spec, "auto") || !strcmp(spec, "all")) {
		cfg->numa_off = 0;
		cfg->n_nodes = 0;
		return 0;
	}
	if (!strcmp(spec, "off")) {
		cfg->numa_off = 1;
		cfg->n_nodes = 0;
		return 0;
	}
	unsigned count = 0;
	const char *p = spec;
	for (;;) {
		char *end;
		unsigned long first, last;
		if (*p < '0' || *p > '9')
			goto bad;
		first = strtoul(p, &end, 10);
		last = first;
		if (*end == '-') {
			p = end + 1;
			if (*p < '0' || *p > '9')
				goto bad;
			last = strtoul(p, &end, 10);
		}
		if (first > last || last > 0xffffffu)
			goto bad;
		if (last - first >= SKV_TOPOLOGY_MAX_NODES - count)
			return skv_errorf(msg, msg_len, -EINVAL,
					  "--numa %s: more than %d nodes", spec,
					  SKV_TOPOLOGY_MAX_NODES);
		for (unsigned long n = first; n <= last; n++)
			cfg->nodes[count++] = (unsigned)n;
		if (*end == '\0')
			break;
		if (*end != ',')
			goto bad;
		p = end + 1;
	}
	cfg->numa_off = 0;
	cfg->n_nodes = count;
	return 0;
bad:
	return skv_errorf(msg, msg_len, -EINVAL,
			  "--numa %s: expected auto, off, or node numbers such as 0,2-3", spec);
}

void skv_placement_free(struct skv_placement *placement)
{
	if (!placement)
		return;
	for (unsigned i = 0; placement->engines && i < placement->n_engines; i++)
		hwloc_bitmap_free(placement->engines[i].cpuset);
	free(placement->engines);
	free(placement->arenas);
	free(placement);
}

/* The node list the placement uses, as indices into topo->nodes. */
static int placement_select(const struct skv_topology *topo,
			    const struct skv_placement_config *cfg, unsigned *sel, unsigned *n_sel,
			    char *msg, size_t msg_len)
{
	char nodes_text[128] = "";
	for (unsigned i = 0, used = 0; i < topo->n_nodes && used < sizeof(nodes_text); i++) {
		int n = snprintf(nodes_text + used, sizeof(nodes_text) - used, "%s%u",
				 i ? "," : "", topo->nodes[i].pub.os_index);
		used += n > 0 ? (unsigned)n : 0;
	}
	*n_sel = 0;
	if (!cfg->n_nodes) {
		for (unsigned i = 0; i < topo->n_nodes; i++)
			if (topo->nodes[i].pub.n_cores)
				sel[(*n_sel)++] = i;
		if (!*n_sel)
			return skv_errorf(msg, msg_len, -EINVAL,
					  "no NUMA node has CPU cores (nodes %s)", nodes_text);
		return 0;
	}
	if (cfg->n_nodes > SKV_TOPOLOGY_MAX_NODES)
		return skv_errorf(msg, msg_len, -EINVAL, "--numa: more than %d nodes",
				  SKV_TOPOLOGY_MAX_NODES);
	for (unsigned i = 0; i < cfg->n_nodes; i++) {
		int idx = topo_index_of_os(topo, cfg->nodes[i]);
		if (idx < 0)
			return skv_errorf(msg, msg_len, -EINVAL,
					  "--numa: node %u does not exist (this machine has nodes %s)",
					  cfg->nodes[i], nodes_text);
		for (unsigned j = 0; j < i; j++)
			if (cfg->nodes[j] == cfg->nodes[i])
				return skv_errorf(msg, msg_len, -EINVAL,
						  "--numa: node %u is listed twice", cfg->nodes[i]);
		if (!topo->nodes[idx].pub.n_cores)
			return skv_errorf(msg, msg_len, -EINVAL,
					  "--numa: node %u has no CPU cores (memory only); leave it "
					  "out of the list",
					  cfg->nodes[i]);
		sel[(*n_sel)++] = (unsigned)idx;
	}
	return 0;
}

/* Water-filling: one engine per node per round while nodes have free cores, then (only for an
 * explicit count above the cores) one per node per round regardless. */
static int placement_spread(unsigned total, const unsigned *capacity, unsigned n,
			    unsigned *counts)
{
	unsigned assigned = 0;
	int progress = 1, shared = 0;
	memset(counts, 0, n * sizeof(*counts));
	while (assigned < total && progress) {
		progress = 0;
		for (unsigned k = 0; k < n && assigned < total; k++) {
			if (counts[k] < capacity[k]) {
				counts[k]++;
				assigned++;
				progress = 1;
			}
		}
	}
	while (assigned < total) {
		shared = 1;
		for (unsigned k = 0; k < n && assigned < total; k++) {
			counts[k]++;
			assigned++;
		}
	}
	return shared;
}

static int placement_alloc(struct skv_placement *pl, unsigned n_arenas, unsigned n_engines)
{
	pl->arenas = calloc(n_arenas, sizeof(*pl->arenas));
	pl->engines = calloc(n_engines, sizeof(*pl->engines));
	if (!pl->arenas || !pl->engines)
		return -ENOMEM;
	pl->n_arenas = n_arenas;
	pl->n_engines = n_engines;
	return 0;
}

static int placement_numa_off(const struct skv_topology *topo, unsigned engines,
			      struct skv_placement *pl)
{
	if (placement_alloc(pl, 1, engines) < 0)
		return -ENOMEM;
	pl->arenas[0].node_os = -1;
	pl->arenas[0].n_engines = engines;
	for (unsigned i = 0; i < topo->n_nodes; i++)
		pl->arenas[0].memory_bytes += topo->nodes[i].pub.memory_bytes;
	for (unsigned e = 0; e < engines; e++) {
		struct skv_engine_place *ep = &pl->engines[e];
		ep->arena = 0;
		ep->node_os = -1;
		ep->pu_os = -1;
		ep->cpuset = hwloc_bitmap_dup(topo->cpuset);
		if (!ep->cpuset)
			return -ENOMEM;
	}
	return 0;
}

int skv_placement_plan(const struct skv_topology *topo, const struct skv_placement_config *cfg,
		       struct skv_placement **out, char *msg, size_t msg_len)
{
	unsigned sel[SKV_TOPOLOGY_MAX_NODES], capacity[SKV_TOPOLOGY_MAX_NODES],
		counts[SKV_TOPOLOGY_MAX_NODES];
	unsigned n_sel = 0, total_cores = 0; /* counted in engines of `threads` cores */
	unsigned threads = cfg->threads > 1 ? cfg->threads : 1;
	*out = NULL;

	if (cfg->numa_off && cfg->n_nodes)
		return skv_errorf(msg, msg_len, -EINVAL,
				  "--numa off cannot be combined with a node list");
	if (cfg->engines > SKV_PLACEMENT_MAX_ENGINES)
		return skv_errorf(msg, msg_len, -EINVAL, "--engines %u: at most %d", cfg->engines,
				  SKV_PLACEMENT_MAX_ENGINES);
	if (cfg->numa_off) {
		for (unsigned i = 0; i < topo->n_nodes; i++)
			total_cores += topo->nodes[i].pub.n_cores;
		total_cores = total_cores / threads ? total_cores / threads : 1;
	} else {
		int err = placement_select(topo, cfg, sel, &n_sel, msg, msg_len);
		if (err < 0)
			return err;
		for (unsigned k = 0; k < n_sel; k++) {
			unsigned cores = topo->nodes[sel[k]].pub.n_cores;
			/* A node with fewer cores than threads still holds one engine. */
			capacity[k] = cores / threads ? cores / threads : 1;
			total_cores += capacity[k];
		}
	}
	unsigned cap = cfg->max_engines ? cfg->max_engines : SKV_PLACEMENT_DEFAULT_MAX_ENGINES;
	unsigned engines = cfg->engines ? cfg->engines
					: (total_cores < cap ? total_cores : cap);
	if (!engines)
		engines = 1; /* a machine whose PUs hwloc could not see still runs one engine */

	struct skv_placement *pl = calloc(1, sizeof(*pl));
	if (!pl)
		return skv_errorf(msg, msg_len, -ENOMEM, "placement: out of memory");
	int err = 0;
	if (cfg->numa_off) {
		pl->shared_cores = engines > total_cores;
		err = placement_numa_off(topo, engines, pl);
		goto done;
	}

	pl->shared_cores = placement_spread(engines, capacity, n_sel, counts);
	unsigned n_arenas = 0;
	for (unsigned k = 0; k < n_sel; k++)
		n_arenas += counts[k] > 0;
	err = placement_alloc(pl, n_arenas, engines);
	unsigned arena = 0, e = 0;
	for (unsigned k = 0; err == 0 && k < n_sel; k++) {
		if (!counts[k])
			continue;
		const struct skv_numa_node *node = &topo->nodes[sel[k]].pub;
		pl->arenas[arena] = (struct skv_arena_place){ .node_os = (int)node->os_index,
							      .n_engines = counts[k],
							      .memory_bytes = node->memory_bytes };
		for (unsigned j = 0; j < counts[k]; j++, e++) {
			struct skv_engine_place *ep = &pl->engines[e];
			ep->arena = arena;
			ep->node_os = (int)node->os_index;
			ep->pu_os = (int)node->core_pu[(j * threads) % node->n_cores];
			ep->cpuset = hwloc_bitmap_alloc();
			if (!ep->cpuset) {
				err = -ENOMEM;
				break;
			}
			for (unsigned t = 0; t < threads; t++)
				if (hwloc_bitmap_set(ep->cpuset,
						     node->core_pu[(j * threads + t) % node->n_cores]) < 0)
					err = -ENOMEM;
			if (err < 0)
				break;
		}
		arena++;
	}
done:
	if (err < 0) {
		skv_placement_free(pl);
		return skv_errorf(msg, msg_len, err, "placement: out of memory");
	}
	*out = pl;
	return 0;
}
