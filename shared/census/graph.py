"""The identity graph's clustering: graph in, individuals out. One pure function, shared by the census job,
`deer-reid eval --protocol census` and the tests.

The graph (per property):
- nodes: detections;
- machine edges: the log-odds log(p / (1 - p)) of the calibrated P(same individual) of a scored pair
  (positive: evidence for one animal, negative: for two; a pair never scored weighs nothing). Two units
  (see below: a sighting, or what people's answers joined) weigh their strongest pair of nodes, not the
  sum of all: the calibration maps a photo's best score against an individual's photos (fusion's "best"
  aggregation), and the frames of one sighting are one look at one animal, not independent evidence;
  summed, two sightings of two frames each would count each look four times, and a pair of sightings
  that each pair of photos calls fairly likely the same animal would end up all but certainly two;
- must-links (hard): the frames of one sighting, a person's `same` (one that no other answer corroborates
  yet is the weakest rule of all, see `shared.census.store.build_graph`);
- cannot-links (hard): two animals of one frame, a person's `different`;
- anchors (hard): detections a person placed keep their individual; two anchored individuals are never
  joined by the machine (a person merges them, with `merge`).

Individuals are the clustering that maximises the sum of the edges' log-odds inside clusters (correlation
clustering, also called the minimum-cost multicut problem) subject to the hard rules. That problem is
NP-hard, so it is solved by a published heuristic that fits a season:

1. Greedy additive edge contraction (GAEC; Keuper, Levinkov, Bonneel, Lavoue, Brox and Andres, "Efficient
   decomposition of image and mesh graphs by lifted multicuts", ICCV 2015): start from the must-link
   units, repeatedly contract the pair of clusters whose edges between them add up to the largest positive
   total, until no pair has a positive total. O(E log E) with a heap and merging the smaller adjacency
   into the larger; a cannot-link or two anchors weigh minus infinity, so the contraction never breaks a
   hard rule.
2. Greedy vertex moves (the single-node moves of Kernighan-Lin local search, as in Keuper et al.'s KLj,
   without its joint moves): each unit moves to the neighbouring cluster (or to a cluster of its own) that
   raises the objective most, until a pass moves nothing. GAEC decides early contractions that later
   evidence can outweigh; the moves repair them.

Why these and not others: the Pivot algorithm (KwikCluster, Ailon, Charikar and Newman 2008) assumes a
complete graph, reading every unscored pair as "different", which is wrong here (most pairs were never
compared); exact ILP or LP solvers do not reach tens of thousands of nodes in minutes; GAEC + moves is what
the multicut literature uses at that size (Levinkov et al., "A comparative study of local search algorithms
for correlation clustering", GCPR 2017, found GAEC followed by KLj near the best on sparse graphs).
Wildbook's Graph ID (Crall 2017) keeps the same objects, positive, negative and "incomparable" edges and
individuals as positive connected components, and repairs inconsistent components by a minimum cut; the
objective here is the weighted form of the same rules.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence

NEG_INF = float("-inf")


class Infeasible(ValueError):
    """The hard rules contradict each other (a must-link chain joins two nodes a cannot-link separates)."""


@dataclass
class IdentityGraph:
    """Nodes are indexes 0..n-1; `weights[(i, j)]` (i < j) the machine's log-odds of the pair."""

    n: int
    weights: dict[tuple[int, int], float] = field(default_factory=dict)
    must: list[tuple[int, int]] = field(default_factory=list)
    cannot: list[tuple[int, int]] = field(default_factory=list)
    anchors: dict[int, Hashable] = field(default_factory=dict)  # node -> the individual a person placed it in
    # the hard rules as they were given, strongest first: ("must" | "cannot", i, j, what); `resolve` turns
    # them into `must` and `cannot`, dropping any that contradicts the anchors or a stronger rule
    rules: list[tuple[str, int, int, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # the rules `resolve` dropped, for the run's summary
    # a person's `same` answers that no other answer corroborates yet (node pairs, i < j; their rules come
    # last): must-links like the others, but a later `different` about the same two sides outweighs them, and
    # the census asks to verify each (`shared.census.plan.questions`). `unconfirmed`: those `resolve` kept.
    tentative: set[tuple[int, int]] = field(default_factory=set)
    unconfirmed: list[tuple[int, int]] = field(default_factory=list)

    def add_edge(self, i: int, j: int, log_odds: float) -> None:
        """A machine edge; a pair scored twice keeps the stronger evidence either way."""
        if i == j:
            return
        key = (i, j) if i < j else (j, i)
        old = self.weights.get(key)
        if old is None or abs(log_odds) > abs(old):
            self.weights[key] = float(log_odds)


    def resolve(self) -> list[str]:
        """Set `must` and `cannot` from the anchors and `rules`, in order; returns what was dropped.

        The anchors come first (a person's placements are never moved), then each rule unless it contradicts
        what is already in: a must-link between two nodes a cannot-link separates (or of two anchored
        individuals), a cannot-link inside one must-link group. So the census always has a solution, and a
        contradiction (a person moved one frame of a sighting; two answers given at once) costs the weaker
        rule, named in the run's summary, instead of the whole run."""
        uf = UnionFind(self.n)
        anchor: dict[int, Hashable] = {}
        apart: dict[int, set[int]] = {}
        first: dict[Hashable, int] = {}
        for node, individual in sorted(self.anchors.items()):
            if individual in first:
                uf.union(node, first[individual])
            else:
                first[individual] = node
        for node, individual in self.anchors.items():
            anchor[uf.find(node)] = individual

        def join(a: int, b: int) -> None:
            ra, rb = uf.find(a), uf.find(b)
            uf.union(ra, rb)
            root = uf.find(ra)
            other = rb if root == ra else ra
            if other in anchor:
                anchor[root] = anchor.pop(other)
            moved = apart.pop(other, set())
            apart.setdefault(root, set()).update(moved)
            for x in moved:
                apart[x].discard(other)
                apart[x].add(root)

        self.must, self.cannot, self.unconfirmed, dropped = [], [], [], []
        for kind, i, j, what in self.rules:
            ri, rj = uf.find(i), uf.find(j)
            if kind == "must":
                two_placed = ri in anchor and rj in anchor and anchor[ri] != anchor[rj]
                if ri != rj and (rj in apart.get(ri, ()) or two_placed):
                    dropped.append(what)
                    continue
                if ri != rj:
                    join(i, j)
                self.must.append((i, j))
                if (min(i, j), max(i, j)) in self.tentative:
                    self.unconfirmed.append((min(i, j), max(i, j)))
            else:
                if ri == rj:
                    dropped.append(what)
                    continue
                apart.setdefault(ri, set()).add(rj)
                apart.setdefault(rj, set()).add(ri)
                self.cannot.append((i, j))
        self.dropped = dropped
        return dropped


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Units:
    """The must-link units: `of[node]` its unit, `members[unit]` its nodes, `anchor[unit]` its individual."""

    of: list[int]
    members: list[list[int]]
    anchor: list[Hashable | None]
    adjacency: list[dict[int, float]]  # unit -> neighbour unit -> summed log-odds (-inf: hard cannot-link)


def units_of(graph: IdentityGraph) -> Units:
    """Contract the must-links (and each anchored individual's nodes) into units; Infeasible on a contradiction."""
    uf = UnionFind(graph.n)
    for i, j in graph.must:
        uf.union(i, j)
    first_of_anchor: dict[Hashable, int] = {}
    for node, individual in graph.anchors.items():
        if individual in first_of_anchor:
            uf.union(node, first_of_anchor[individual])
        else:
            first_of_anchor[individual] = node
    roots = sorted({uf.find(i) for i in range(graph.n)})
    index = {r: k for k, r in enumerate(roots)}
    of = [index[uf.find(i)] for i in range(graph.n)]
    members: list[list[int]] = [[] for _ in roots]
    for i, u in enumerate(of):
        members[u].append(i)
    anchor: list[Hashable | None] = [None] * len(roots)
    for node, individual in graph.anchors.items():
        u = of[node]
        if anchor[u] is not None and anchor[u] != individual:
            raise Infeasible(f"nodes {members[u][:2]} must be one animal, yet a person placed them in individuals "
                             f"{anchor[u]} and {individual}")
        anchor[u] = individual
    adjacency: list[dict[int, float]] = [{} for _ in roots]
    for (i, j), w in graph.weights.items():
        a, b = of[i], of[j]
        if a != b and math.isfinite(w):
            best = max(w, adjacency[a].get(b, NEG_INF))  # two units weigh their strongest pair (see above)
            adjacency[a][b] = adjacency[b][a] = best
    for i, j in graph.cannot:
        a, b = of[i], of[j]
        if a == b:
            raise Infeasible(f"nodes {i} and {j} are two animals, yet must-links join them")
        adjacency[a][b] = adjacency[b][a] = NEG_INF
    return Units(of, members, anchor, adjacency)


def _gaec(units: Units) -> list[int]:
    """Greedy additive edge contraction over the units; returns each unit's cluster (a unit index)."""
    k = len(units.members)
    adj = [dict(a) for a in units.adjacency]
    anchor = list(units.anchor)
    alive = [True] * k
    cluster_of = list(range(k))  # unit -> its current cluster representative
    contents = [[u] for u in range(k)]
    heap = [(-w, a, b) for a in range(k) for b, w in adj[a].items() if a < b and w > 0]
    heapq.heapify(heap)
    while heap:
        neg, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or adj[a].get(b) != -neg:
            continue  # stale: one side was contracted, or the pair's total changed since it was pushed
        if anchor[a] is not None and anchor[b] is not None and anchor[a] != anchor[b]:
            adj[a][b] = adj[b][a] = NEG_INF
            continue
        if len(adj[a]) < len(adj[b]):
            a, b = b, a  # fold the smaller adjacency into the larger
        alive[b] = False
        anchor[a] = anchor[a] if anchor[a] is not None else anchor[b]
        contents[a].extend(contents[b])
        contents[b] = []
        del adj[a][b]
        for x, w in adj[b].items():
            if x == a:
                continue
            del adj[x][b]
            total = adj[a].get(x, 0.0) + w  # -inf stays -inf: a cannot-link outlives every contraction
            adj[a][x] = adj[x][a] = total
            if total > 0:
                heapq.heappush(heap, (-total, min(a, x), max(a, x)))
        adj[b] = {}
    for rep in range(k):
        for u in contents[rep]:
            cluster_of[u] = rep
    return cluster_of


def _moves(units: Units, cluster_of: list[int], max_passes: int = 20) -> list[int]:
    """Greedy single-unit moves until none raises the objective (each pass visits units in index order)."""
    k = len(units.members)
    cluster_of = list(cluster_of)
    anchor_of_cluster: dict[int, Hashable] = {}
    size: dict[int, int] = {}
    for u in range(k):
        size[cluster_of[u]] = size.get(cluster_of[u], 0) + 1
        if units.anchor[u] is not None:
            anchor_of_cluster[cluster_of[u]] = units.anchor[u]
    free = iter(range(k, 2 ** 62))  # fresh cluster labels for units that leave to be on their own
    for _ in range(max_passes):
        moved = 0
        for u in range(k):
            here = cluster_of[u]
            towards: dict[int, float] = {}
            for v, w in units.adjacency[u].items():
                c = cluster_of[v]
                towards[c] = towards.get(c, 0.0) + w
            stay = towards.get(here, 0.0)
            best, gain = None, 0.0
            if size[here] > 1 and -stay > 1e-9:
                best, gain = "alone", -stay  # leaving to be alone gains what staying costs
            for c, w in towards.items():
                if c == here or w == NEG_INF:
                    continue
                if units.anchor[u] is not None and anchor_of_cluster.get(c, units.anchor[u]) != units.anchor[u]:
                    continue
                if w - stay > gain + 1e-9:
                    best, gain = c, w - stay
            if best is None:
                continue
            target = next(free) if best == "alone" else best
            size[here] -= 1
            size[target] = size.get(target, 0) + 1
            if units.anchor[u] is not None:
                anchor_of_cluster.pop(here, None)
                anchor_of_cluster[target] = units.anchor[u]
            cluster_of[u] = target
            moved += 1
        if not moved:
            break
    return cluster_of


@dataclass(frozen=True)
class Clustering:
    labels: list[int]  # per node: its cluster (0..clusters-1, numbered by first node)
    objective: float  # the summed log-odds inside clusters
    units: int


def cluster(graph: IdentityGraph, *, refine: bool = True) -> Clustering:
    """The individuals of the graph: GAEC, then greedy moves (see the module's docstring). Deterministic."""
    units = units_of(graph)
    by_unit = _gaec(units)
    if refine:
        by_unit = _moves(units, by_unit)
    labels_raw = [by_unit[units.of[i]] for i in range(graph.n)]
    renumber: dict[int, int] = {}
    labels = [renumber.setdefault(c, len(renumber)) for c in labels_raw]
    return Clustering(labels, objective(graph, labels, units), len(units.members))


def objective(graph: IdentityGraph, labels: Sequence[int], units: Units | None = None) -> float:
    """The summed log-odds inside clusters of each pair of units, by its strongest pair of nodes (what
    `cluster` maximises)."""
    units = units or units_of(graph)
    return float(sum(w for u, adj in enumerate(units.adjacency) for v, w in adj.items()
                     if u < v and math.isfinite(w) and labels[units.members[u][0]] == labels[units.members[v][0]]))


def violations(graph: IdentityGraph, labels: Sequence[Hashable | None]) -> list[str]:
    """The hard rules a labelling breaks (None: a node not placed, which breaks nothing)."""
    out = []
    for i, j in graph.must:
        if labels[i] != labels[j]:
            out.append(f"must-link {i}-{j} split")
    for i, j in graph.cannot:
        if labels[i] is not None and labels[i] == labels[j]:
            out.append(f"cannot-link {i}-{j} joined")
    seen: dict[Hashable, Hashable] = {}
    for node, individual in graph.anchors.items():
        if labels[node] in seen and seen[labels[node]] != individual:
            out.append(f"anchors {seen[labels[node]]} and {individual} joined")
        seen.setdefault(labels[node], individual)
    return out


def bridges(edges: Sequence[tuple[Hashable, Hashable]]) -> set[int]:
    """The indexes of the edges of a multigraph whose removal disconnects their two ends (Tarjan's bridges,
    iterative). Two parallel edges are never bridges: each corroborates the other."""
    adjacency: dict[Hashable, list[tuple[Hashable, int]]] = {}
    for k, (a, b) in enumerate(edges):
        if a == b:
            continue
        adjacency.setdefault(a, []).append((b, k))
        adjacency.setdefault(b, []).append((a, k))
    order: dict[Hashable, int] = {}
    low: dict[Hashable, int] = {}
    out: set[int] = set()
    for root in adjacency:
        if root in order:
            continue
        order[root] = low[root] = len(order)
        stack = [(root, -1, iter(adjacency[root]))]
        while stack:
            node, via, it = stack[-1]
            step = next(it, None)
            if step is None:
                stack.pop()
                if stack:
                    parent = stack[-1][0]
                    low[parent] = min(low[parent], low[node])
                    if low[node] > order[parent]:
                        out.add(via)
                continue
            other, k = step
            if k == via:
                continue  # the edge we came by (a parallel edge has another index and counts)
            if other in order:
                low[node] = min(low[node], order[other])
            else:
                order[other] = low[other] = len(order)
                stack.append((other, k, iter(adjacency[other])))
    return out
