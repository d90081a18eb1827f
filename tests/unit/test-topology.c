/* Machine topology and engine placement: synthetic topologies of 1, 2 and 4 NUMA nodes, an XML
 * export, and this machine. */
#include <criterion/criterion.h>
#include <errno.h>
#include <hwloc.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "skv-error.h"
#include "testutil.h"
#include "topology.h"

static struct skv_topology *load_synthetic(const char *description)
{
	struct skv_topology *topo = NULL;
	char msg[256] = "";
	int err = skv_topology_new_synthetic(description, &topo, msg, sizeof(msg));
	cr_assert_eq(err, 0, "%s: %s", description, msg);
	cr_assert_not_null(topo);
	return topo;
}

static struct skv_placement *plan(const struct skv_topology *topo,
				  const struct skv_placement_config *cfg)
{
	struct skv_placement *pl = NULL;
	char msg[256] = "";
	int err = skv_placement_plan(topo, cfg, &pl, msg, sizeof(msg));
	cr_assert_eq(err, 0, "placement failed: %s", msg);
	cr_assert_not_null(pl);
	return pl;
}

/* Invariants every pinned plan keeps: engines of an arena use its node, each engine's cpuset
 * is one core (a PU of its node), no two engines share a core unless shared_cores, and the
 * engine counts of the arenas differ by at most one. */
static void check_plan(const struct skv_topology *topo, const struct skv_placement *pl)
{
	unsigned per_arena[SKV_TOPOLOGY_MAX_NODES] = { 0 };
	cr_assert_geq(pl->n_arenas, 1);
	for (unsigned e = 0; e < pl->n_engines; e++) {
		const struct skv_engine_place *ep = &pl->engines[e];
		cr_assert_lt(ep->arena, pl->n_arenas);
		cr_assert_eq(ep->node_os, pl->arenas[ep->arena].node_os);
		const struct skv_numa_node *node = skv_topology_node_by_os(topo, (unsigned)ep->node_os);
		cr_assert_not_null(node, "engine %u on unknown node %d", e, ep->node_os);
		cr_assert_geq(ep->pu_os, 0);
		cr_assert_eq(hwloc_bitmap_weight(ep->cpuset), 1, "engine %u pinned to one PU", e);
		cr_assert(hwloc_bitmap_isset(ep->cpuset, (unsigned)ep->pu_os));
		cr_assert(hwloc_bitmap_isincluded(ep->cpuset, node->cpuset),
			  "engine %u's core is not on its node %d", e, ep->node_os);
		int is_core = 0;
		for (unsigned c = 0; c < node->n_cores; c++)
			is_core |= node->core_pu[c] == (unsigned)ep->pu_os;
		cr_assert(is_core, "engine %u's PU %d is not a core's first PU", e, ep->pu_os);
		per_arena[ep->arena]++;
		if (!pl->shared_cores)
			for (unsigned f = 0; f < e; f++)
				cr_assert_neq(pl->engines[f].pu_os, ep->pu_os,
					      "engines %u and %u share PU %d", f, e, ep->pu_os);
	}
	unsigned lo = ~0u, hi = 0, total = 0;
	for (unsigned a = 0; a < pl->n_arenas; a++) {
		cr_assert_eq(per_arena[a], pl->arenas[a].n_engines);
		cr_assert_geq(per_arena[a], 1, "arena %u without engines", a);
		lo = per_arena[a] < lo ? per_arena[a] : lo;
		hi = per_arena[a] > hi ? per_arena[a] : hi;
		total += per_arena[a];
		for (unsigned b = 0; b < a; b++)
			cr_assert_neq(pl->arenas[a].node_os, pl->arenas[b].node_os);
	}
	cr_assert_eq(total, pl->n_engines);
	cr_assert_leq(hi - lo, 1, "engines spread unevenly: %u to %u per node", lo, hi);
}

Test(topology, one_node)
{
	struct skv_topology *topo = load_synthetic("pack:1 numa:1 l3:1 core:4 pu:2");
	cr_assert_eq(skv_topology_is_this_system(topo), 0);
	cr_assert_eq(skv_topology_node_count(topo), 1);
	const struct skv_numa_node *node = skv_topology_node(topo, 0);
	cr_assert_eq(node->n_cores, 4);
	cr_assert_gt(node->memory_bytes, 0);
	cr_assert_eq(hwloc_bitmap_weight(node->cpuset), 8);
	cr_assert_null(skv_topology_node(topo, 1));

	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 1);
	cr_assert_eq(pl->n_engines, 4, "default: one engine per core");
	cr_assert_eq(pl->shared_cores, 0);
	check_plan(topo, pl);
	skv_placement_free(pl);

	/* The cap applies to the default count. */
	cfg.max_engines = 3;
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_engines, 3);
	check_plan(topo, pl);
	skv_placement_free(pl);

	/* More engines than cores: allowed, and said. */
	cfg.engines = 6;
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_engines, 6);
	cr_assert_eq(pl->shared_cores, 1);
	check_plan(topo, pl);
	skv_placement_free(pl);
	skv_topology_destroy(topo);
}

Test(topology, two_nodes)
{
	struct skv_topology *topo = load_synthetic("pack:2 numa:1 l3:1 core:4 pu:2");
	cr_assert_eq(skv_topology_node_count(topo), 2);
	for (unsigned i = 0; i < 2; i++) {
		const struct skv_numa_node *node = skv_topology_node(topo, i);
		cr_assert_eq(node->n_cores, 4);
		cr_assert_eq(node->os_index, i);
		cr_assert_eq(skv_topology_node_by_os(topo, i), node);
	}
	cr_assert(!hwloc_bitmap_intersects(skv_topology_node(topo, 0)->cpuset,
					   skv_topology_node(topo, 1)->cpuset));

	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 2);
	cr_assert_eq(pl->n_engines, 8);
	cr_assert_eq(pl->arenas[0].n_engines, 4);
	cr_assert_eq(pl->arenas[1].n_engines, 4);
	check_plan(topo, pl);
	skv_placement_free(pl);

	for (unsigned n = 1; n <= 12; n++) {
		cfg.engines = n;
		pl = plan(topo, &cfg);
		cr_assert_eq(pl->n_engines, n);
		cr_assert_eq(pl->n_arenas, n >= 2 ? 2u : 1u, "%u engines", n);
		cr_assert_eq(pl->shared_cores, n > 8);
		check_plan(topo, pl);
		skv_placement_free(pl);
	}

	/* An explicit node: only that node gets engines and an arena. */
	char msg[256] = "";
	cfg.engines = 0;
	cr_assert_eq(skv_placement_parse_numa("1", &cfg, msg, sizeof(msg)), 0, "%s", msg);
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 1);
	cr_assert_eq(pl->arenas[0].node_os, 1);
	cr_assert_eq(pl->n_engines, 4);
	check_plan(topo, pl);
	skv_placement_free(pl);
	skv_topology_destroy(topo);
}

Test(topology, four_nodes)
{
	struct skv_topology *topo = load_synthetic("pack:4 numa:1 l3:1 core:2 pu:1");
	cr_assert_eq(skv_topology_node_count(topo), 4);
	char summary[512];
	int n = skv_topology_summary(topo, summary, sizeof(summary));
	cr_assert(n > 0 && (size_t)n < sizeof(summary));
	cr_assert(strstr(summary, "4 NUMA nodes") && strstr(summary, "node 3: 2 cores"), "%s",
		  summary);

	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 4);
	cr_assert_eq(pl->n_engines, 8);
	check_plan(topo, pl);
	skv_placement_free(pl);

	/* A cap that does not divide evenly: 2,2,1,1. */
	cfg.max_engines = 6;
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_engines, 6);
	check_plan(topo, pl);
	skv_placement_free(pl);

	/* Node lists, with ranges. */
	char msg[256] = "";
	cfg.max_engines = 0;
	cr_assert_eq(skv_placement_parse_numa("1,3", &cfg, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(cfg.n_nodes, 2);
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 2);
	cr_assert_eq(pl->arenas[0].node_os, 1);
	cr_assert_eq(pl->arenas[1].node_os, 3);
	cr_assert_eq(pl->n_engines, 4);
	check_plan(topo, pl);
	skv_placement_free(pl);

	cr_assert_eq(skv_placement_parse_numa("0-2", &cfg, msg, sizeof(msg)), 0, "%s", msg);
	cfg.engines = 5;
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 3);
	cr_assert_eq(pl->n_engines, 5);
	check_plan(topo, pl);
	for (unsigned e = 0; e < pl->n_engines; e++)
		cr_assert_neq(pl->engines[e].node_os, 3);
	skv_placement_free(pl);
	skv_topology_destroy(topo);
}

Test(topology, invalid_node_lists)
{
	struct skv_topology *topo = load_synthetic("pack:4 numa:1 l3:1 core:2 pu:1");
	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = NULL;
	char msg[256] = "";

	cr_assert_eq(skv_placement_parse_numa("7", &cfg, msg, sizeof(msg)), 0);
	cr_assert_eq(skv_placement_plan(topo, &cfg, &pl, msg, sizeof(msg)), -EINVAL);
	cr_assert_null(pl);
	cr_assert(strstr(msg, "node 7 does not exist") && strstr(msg, "0,1,2,3"), "%s", msg);

	cr_assert_eq(skv_placement_parse_numa("1,2,1", &cfg, msg, sizeof(msg)), 0);
	cr_assert_eq(skv_placement_plan(topo, &cfg, &pl, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "node 1 is listed twice"), "%s", msg);

	static const char *const bad[] = { "", "a", "1,", ",1", "1-", "3-1", "1;2", "-1", "1 2",
					   "0x1", "99999999999" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		msg[0] = '\0';
		cr_assert_eq(skv_placement_parse_numa(bad[i], &cfg, msg, sizeof(msg)), -EINVAL,
			     "\"%s\" accepted", bad[i]);
		cr_assert(strstr(msg, "--numa"), "%s", msg);
	}

	cfg = (struct skv_placement_config){ .numa_off = 1, .n_nodes = 1, .nodes = { 0 } };
	cr_assert_eq(skv_placement_plan(topo, &cfg, &pl, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "off"), "%s", msg);

	cfg = (struct skv_placement_config){ .engines = SKV_PLACEMENT_MAX_ENGINES + 1 };
	cr_assert_eq(skv_placement_plan(topo, &cfg, &pl, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "--engines"), "%s", msg);

	struct skv_topology *none = NULL;
	cr_assert_eq(skv_topology_new_synthetic("pack:2 bogus:3", &none, msg, sizeof(msg)),
		     -EINVAL);
	cr_assert_null(none);
	cr_assert(strstr(msg, "synthetic"), "%s", msg);
	skv_topology_destroy(topo);
}

Test(topology, numa_off)
{
	struct skv_topology *topo = load_synthetic("pack:2 numa:1 l3:1 core:4 pu:2");
	struct skv_placement_config cfg = { 0 };
	char msg[256] = "";
	cr_assert_eq(skv_placement_parse_numa("off", &cfg, msg, sizeof(msg)), 0);
	cr_assert_eq(cfg.numa_off, 1);
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 1);
	cr_assert_eq(pl->arenas[0].node_os, -1);
	cr_assert_eq(pl->arenas[0].memory_bytes, skv_topology_node(topo, 0)->memory_bytes +
							 skv_topology_node(topo, 1)->memory_bytes);
	cr_assert_eq(pl->n_engines, 8);
	for (unsigned e = 0; e < pl->n_engines; e++) {
		cr_assert_eq(pl->engines[e].arena, 0);
		cr_assert_eq(pl->engines[e].node_os, -1);
		cr_assert_eq(pl->engines[e].pu_os, -1);
		cr_assert(hwloc_bitmap_isequal(pl->engines[e].cpuset, skv_topology_cpuset(topo)),
			  "an unpinned engine may run on every PU");
	}
	skv_placement_free(pl);

	cfg.engines = 3;
	pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_engines, 3);
	cr_assert_eq(pl->arenas[0].n_engines, 3);
	skv_placement_free(pl);

	cr_assert_eq(skv_placement_parse_numa("auto", &cfg, msg, sizeof(msg)), 0);
	cr_assert_eq(cfg.numa_off, 0);
	cr_assert_eq(cfg.n_nodes, 0);
	skv_topology_destroy(topo);
}

/* Cores of a node are handed out across its L3 caches first. */
Test(topology, spread_over_l3)
{
	struct skv_topology *topo = load_synthetic("numa:1 l3:2 core:2 pu:1");
	const struct skv_numa_node *node = skv_topology_node(topo, 0);
	cr_assert_eq(node->n_cores, 4);
	/* PUs 0,1 share the first L3 and 2,3 the second. */
	cr_assert_eq(node->core_pu[0] / 2 == node->core_pu[1] / 2, 0,
		     "first two engines share an L3: PUs %u, %u", node->core_pu[0],
		     node->core_pu[1]);
	struct skv_placement_config cfg = { .engines = 2 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_neq(pl->engines[0].pu_os / 2, pl->engines[1].pu_os / 2);
	check_plan(topo, pl);
	skv_placement_free(pl);
	skv_topology_destroy(topo);
}

/* A NUMA node attached next to another at the same level (HBM, CXL) gets no cores: it is never
 * picked by default and refused when named. */
Test(topology, memory_only_nodes)
{
	struct skv_topology *topo = load_synthetic("pack:2 [numa] [numa] core:2 pu:1");
	cr_assert_eq(skv_topology_node_count(topo), 4);
	unsigned with_cores = 0, total = 0;
	for (unsigned i = 0; i < 4; i++) {
		total += skv_topology_node(topo, i)->n_cores;
		with_cores += skv_topology_node(topo, i)->n_cores > 0;
	}
	cr_assert_eq(total, 4, "every core belongs to exactly one node");
	cr_assert_eq(with_cores, 2);

	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_arenas, 2);
	cr_assert_eq(pl->n_engines, 4);
	check_plan(topo, pl);
	skv_placement_free(pl);

	unsigned memory_only = 0;
	for (unsigned i = 0; i < 4; i++)
		if (!skv_topology_node(topo, i)->n_cores)
			memory_only = skv_topology_node(topo, i)->os_index;
	cfg = (struct skv_placement_config){ .n_nodes = 1, .nodes = { memory_only } };
	char msg[256] = "";
	cr_assert_eq(skv_placement_plan(topo, &cfg, &pl, msg, sizeof(msg)), -EINVAL);
	cr_assert(strstr(msg, "no CPU cores"), "%s", msg);
	skv_topology_destroy(topo);
}

Test(topology, xml_export, .fini = tu_scratch_cleanup)
{
	hwloc_topology_t hw;
	cr_assert_eq(hwloc_topology_init(&hw), 0);
	cr_assert_eq(hwloc_topology_set_synthetic(hw, "pack:2 numa:1 core:3 pu:2"), 0);
	cr_assert_eq(hwloc_topology_load(hw), 0);
	char path[4096];
	snprintf(path, sizeof(path), "%s/topo.xml", tu_scratch_dir("topology-xml"));
	cr_assert_eq(hwloc_topology_export_xml(hw, path, 0), 0);
	hwloc_topology_destroy(hw);

	struct skv_topology *topo = NULL;
	char msg[256] = "";
	cr_assert_eq(skv_topology_new_xml(path, &topo, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(skv_topology_node_count(topo), 2);
	cr_assert_eq(skv_topology_node(topo, 1)->n_cores, 3);
	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	cr_assert_eq(pl->n_engines, 6);
	check_plan(topo, pl);
	skv_placement_free(pl);
	skv_topology_destroy(topo);

	topo = NULL;
	cr_assert_lt(skv_topology_new_xml("/nonexistent/topo.xml", &topo, msg, sizeof(msg)), 0);
	cr_assert_null(topo);
	cr_assert(strstr(msg, "/nonexistent/topo.xml"), "%s", msg);
	const char *junk = tu_write_scratch("junk.xml", "not xml", 7);
	cr_assert_lt(skv_topology_new_xml(junk, &topo, msg, sizeof(msg)), 0);
	cr_assert_null(topo);
	cr_assert(strstr(msg, "junk.xml"), "%s", msg);
}

/* Binding needs the real machine: a synthetic topology refuses it. */
Test(topology, synthetic_cannot_bind)
{
	struct skv_topology *topo = load_synthetic("pack:2 numa:1 core:2 pu:1");
	cr_assert_eq(skv_topology_bind_thread(topo, skv_topology_node(topo, 0)->cpuset),
		     -EOPNOTSUPP);
	char page[4096] __attribute__((aligned(4096)));
	cr_assert_eq(skv_topology_bind_memory(topo, page, sizeof(page), 0), -EOPNOTSUPP);
	skv_topology_destroy(topo);
}

Test(topology, this_machine)
{
	struct skv_topology *topo = NULL;
	char msg[256] = "";
	cr_assert_eq(skv_topology_new(&topo, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(skv_topology_is_this_system(topo), 1);
	unsigned nodes = skv_topology_node_count(topo), cores = 0;
	cr_assert_geq(nodes, 1);
	for (unsigned i = 0; i < nodes; i++)
		cores += skv_topology_node(topo, i)->n_cores;
	cr_assert_geq(cores, 1);
	cr_assert_leq(cores, (unsigned)hwloc_bitmap_weight(skv_topology_cpuset(topo)));

	struct skv_placement_config cfg = { 0 };
	struct skv_placement *pl = plan(topo, &cfg);
	unsigned expect = cores < SKV_PLACEMENT_DEFAULT_MAX_ENGINES
				  ? cores
				  : SKV_PLACEMENT_DEFAULT_MAX_ENGINES;
	cr_assert_eq(pl->n_engines, expect);
	check_plan(topo, pl);

	/* Pin this thread like an engine and read the kernel's affinity back. */
	cpu_set_t before, after;
	cr_assert_eq(sched_getaffinity(0, sizeof(before), &before), 0);
	const struct skv_engine_place *ep = &pl->engines[pl->n_engines - 1];
	cr_assert_eq(skv_topology_bind_thread(topo, ep->cpuset), 0);
	cr_assert_eq(sched_getaffinity(0, sizeof(after), &after), 0);
	cr_assert_eq(CPU_COUNT(&after), 1);
	cr_assert(CPU_ISSET(ep->pu_os, &after));
	cr_assert_eq(sched_setaffinity(0, sizeof(before), &before), 0);

	/* Bind memory to the first engine's node and read the policy back. */
	size_t len = 1 << 20;
	void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	cr_assert_neq(mem, MAP_FAILED);
	int node = pl->engines[0].node_os;
	int err = skv_topology_bind_memory(topo, mem, len, (unsigned)node);
	if (err == -ENOSYS) {
		munmap(mem, len);
		skv_placement_free(pl);
		skv_topology_destroy(topo);
		cr_skip_test("the kernel has no NUMA memory policy support (mbind: ENOSYS)");
	}
	cr_assert_eq(err, 0, "bind_memory: %s", skv_strerror(err));
	cr_assert_eq(skv_topology_bind_memory(topo, mem, len, 4000), -ENOENT);
	hwloc_topology_t hw;
	cr_assert_eq(hwloc_topology_init(&hw), 0);
	cr_assert_eq(hwloc_topology_load(hw), 0);
	hwloc_bitmap_t nodeset = hwloc_bitmap_alloc();
	hwloc_membind_policy_t policy;
	cr_assert_eq(hwloc_get_area_membind(hw, mem, len, nodeset, &policy, HWLOC_MEMBIND_BYNODESET),
		     0);
	cr_assert_eq(policy, HWLOC_MEMBIND_BIND);
	cr_assert(hwloc_bitmap_isset(nodeset, (unsigned)node));
	cr_assert_eq(hwloc_bitmap_weight(nodeset), 1);
	hwloc_bitmap_free(nodeset);
	hwloc_topology_destroy(hw);
	munmap(mem, len);
	skv_placement_free(pl);
	skv_topology_destroy(topo);
}
