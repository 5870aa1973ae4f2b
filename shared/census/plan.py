"""From a solved identity graph to what the census job changes and what it asks (pure).

`plan` compares the individuals the property holds now with the graph's clustering and decides, unit by
unit (a unit: detections that must be one animal), which moves the evidence carries:
- each solved cluster takes the existing individual that holds most of its detections (a person's
  anchored individual always keeps its own), or a new individual when it holds none;
- a unit moves to its cluster's individual when the evidence for the move clears the threshold (the
  log-odds of the calibrated match threshold): its log-odds towards its new cluster minus those towards
  where it is now (for a detection in review: minus the best alternative, a cluster of its own included);
- a move the hard rules require (a person's answer, two animals of one frame) is made whatever its evidence;
- the rest stay where they are and become questions.

`questions` ranks what to ask next in the applied census: for each pair of individuals the machine links,
"are these one animal?" (the chance the answer merges them times the detections that would move), and
for each unit inside an individual, "does it belong?" (the chance it leaves times its detections):
uncertainty times effect, as the issue of people's time asks. A person's `same` that no other answer
corroborates is asked once more on another pair of the same two sides (Graph ID's positive redundancy):
where the machine thinks a match unlikely, as it does for most questions, a `same` is as likely a slip as
the truth, and one slip merges two animals for good. `stopping` estimates how many questions are
left before the census stops changing (Graph ID's stopping rule in spirit: stop when what is left is
unlikely to change anything).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from shared.calibrated import sigmoid
from shared.census.graph import NEG_INF, IdentityGraph, Units, UnionFind, units_of


@dataclass(frozen=True)
class NewIndividual:
    """A solved cluster that holds no existing individual: the job founds one for it."""

    cluster: int


@dataclass(frozen=True)
class Move:
    nodes: tuple[int, ...]
    before: Hashable | None
    after: Hashable | None
    evidence: float  # log-odds for the move (inf: the hard rules require it)
    applied: bool


@dataclass
class Plan:
    target: list[Hashable | None]  # per node: the individual it ends in (None: stays in review)
    moves: list[Move] = field(default_factory=list)
    merged: dict[Hashable, Hashable] = field(default_factory=dict)  # emptied individual -> the one it joined

    @property
    def applied(self) -> list[Move]:
        return [m for m in self.moves if m.applied]

    @property
    def deferred(self) -> list[Move]:
        return [m for m in self.moves if not m.applied]


def plan(graph: IdentityGraph, current: Sequence[Hashable | None], solved: Sequence[int], threshold: float,
         units: Units | None = None) -> Plan:
    """What changes from `current` (each node's individual; None: in review) towards `solved` (each node's
    cluster), moving only what the evidence or the hard rules carry (see the module's docstring)."""
    units = units or units_of(graph)
    k = len(units.members)
    sol = [solved[m[0]] for m in units.members]
    cur = []
    for m in units.members:
        placed = Counter(current[i] for i in m if current[i] is not None)
        cur.append(min(placed, key=lambda ind: (-placed[ind], str(ind))) if placed else None)
    # each solved cluster takes one individual: anchored clusters their anchor, the rest by most detections
    clusters: dict[int, list[int]] = defaultdict(list)
    for u in range(k):
        clusters[sol[u]].append(u)
    pick: dict[int, Hashable] = {}
    taken: set = set()
    for c, us in clusters.items():
        anchors = sorted({units.anchor[u] for u in us if units.anchor[u] is not None}, key=str)
        if anchors:  # two only when a person placed one while the graph was solved: the first keeps the cluster
            pick[c] = anchors[0]
            taken.update(anchors)
    held: dict[int, Counter] = {c: Counter() for c in clusters}
    for u in range(k):
        for i in units.members[u]:
            if current[i] is not None:
                held[sol[u]][current[i]] += 1
    order = sorted((c for c in clusters if c not in pick),
                   key=lambda c: (-sum(len(units.members[u]) for u in clusters[c]), c))
    for c in order:
        choice = next((ind for ind, _ in sorted(held[c].items(), key=lambda kv: (-kv[1], str(kv[0])))
                       if ind not in taken), None)
        pick[c] = choice if choice is not None else NewIndividual(c)
        if choice is not None:
            taken.add(choice)

    def towards(u: int, labels: Sequence) -> dict:
        out: dict = {}
        for v, w in units.adjacency[u].items():
            out[labels[v]] = out.get(labels[v], 0.0) + w
        return out

    target_u: list[Hashable | None] = list(cur)
    result = Plan(target=[None] * graph.n)
    forced = [len({current[i] for i in m}) > 1 for m in units.members]  # a unit split across individuals
    for u in range(k):
        new = pick[sol[u]]
        old = cur[u]
        if new == old and not forced[u]:
            continue
        w_new = towards(u, sol).get(sol[u], 0.0)
        if old is not None:
            w_alt = towards(u, cur).get(old, 0.0)
        else:
            others = [w for c, w in towards(u, sol).items() if c != sol[u]]
            w_alt = max([0.0, *others]) if len(clusters[sol[u]]) > 1 else max(others, default=0.0)
            if len(clusters[sol[u]]) == 1 and not others:
                continue  # in review with no evidence either way: it stays there
        evidence = math.inf if forced[u] else w_new - w_alt
        # a unit a person placed moves only into that individual (its other frames follow it there)
        may = units.anchor[u] is None or new == units.anchor[u]
        applied = may and (forced[u] or evidence >= threshold)
        if applied:
            target_u[u] = new
        result.moves.append(Move(tuple(units.members[u]), old, new, evidence, applied))
    # a unit left where it was may now share an individual with a unit its hard rules separate it from
    # (the solution keeps them apart, so the one not yet where the solution puts it goes there; failing that,
    # the one that moved goes back)
    for _ in range(k + 1):
        clash = _cannot_clash(units, target_u)
        if clash is None:
            break
        movable = [x for x in clash if units.anchor[x] is None or pick[sol[x]] == units.anchor[x]]
        go = next((x for x in movable if target_u[x] != pick[sol[x]]), None)
        back = next((x for x in clash if target_u[x] != cur[x] and units.anchor[x] is None), None)
        if go is not None:
            target_u[go], applied = pick[sol[go]], True
        elif back is not None:
            go, applied = back, False
            target_u[go] = cur[go]
        else:
            break
        nodes = tuple(units.members[go])
        result.moves = [m for m in result.moves if m.nodes != nodes]
        result.moves.append(Move(nodes, cur[go], pick[sol[go]], math.inf, applied))
    for u in range(k):
        for i in units.members[u]:
            result.target[i] = target_u[u]
    before = Counter(ind for ind in current if ind is not None)
    after_of: dict[Hashable, set] = defaultdict(set)
    for i, ind in enumerate(current):
        if ind is not None:
            after_of[ind].add(result.target[i])
    kept = set(result.target)
    for ind in before:
        if ind not in kept and len(after_of[ind]) == 1:
            (into,) = after_of[ind]
            if into is not None and not isinstance(into, NewIndividual):
                result.merged[ind] = into
    return result


def _cannot_clash(units: Units, target: Sequence) -> tuple[int, int] | None:
    """Two units cannot-linked to each other that share an individual."""
    for u, adj in enumerate(units.adjacency):
        if target[u] is None:
            continue
        for v, w in adj.items():
            if w == NEG_INF and target[v] == target[u]:
                return u, v
    return None


@dataclass(frozen=True)
class Question:
    a: int  # node indexes of the pair to show (a split: `a` is the detection whose place is in question)
    b: int
    kind: str  # 'merge': are these two individuals one animal? 'split': does this detection belong?
    log_odds: float  # the pair's machine evidence
    flip: float  # the chance the answer changes the census
    moves: int  # detections the change would move
    priority: float  # flip x moves


def questions(graph: IdentityGraph, labels: Sequence[Hashable | None], asked: set[tuple[int, int]],
              *, min_flip: float = 0.01, units: Units | None = None, reviewer_error: float = 0.02) -> list[Question]:
    """Candidate questions in the labelled census, best first (see the module's docstring). `asked`: pairs
    (i < j) a person already answered or could not tell apart, never asked again. `reviewer_error`: the
    share of answers assumed wrong, for the chance that an uncorroborated `same` was a slip."""
    units = units or units_of(graph)
    k = len(units.members)
    group = [labels[m[0]] if labels[m[0]] is not None else ("review", u) for u, m in enumerate(units.members)]
    size: Counter = Counter()
    for u in range(k):
        size[group[u]] += len(units.members[u])
    units_in: Counter = Counter(group)
    between: dict[tuple, float] = defaultdict(float)
    best_pair: dict[tuple, tuple[float, int, int]] = {}
    best_inside: dict[int, tuple[float, int, int]] = {}
    for u in range(k):  # the evidence between two groups: their units' pairs, each by its strongest pair
        for v, w in units.adjacency[u].items():
            if u < v and math.isfinite(w) and group[u] != group[v]:
                key = (group[u], group[v]) if str(group[u]) < str(group[v]) else (group[v], group[u])
                between[key] += w
    for (i, j), w in graph.weights.items():
        ui, uj = units.of[i], units.of[j]
        if ui == uj or not math.isfinite(w):
            continue
        gi, gj = group[ui], group[uj]
        if gi != gj:
            key = (gi, gj) if str(gi) < str(gj) else (gj, gi)
            if (i, j) not in asked and (key not in best_pair or w > best_pair[key][0]):
                best_pair[key] = (w, i, j)
        elif (i, j) not in asked:
            for u in (ui, uj):
                if u not in best_inside or w > best_inside[u][0]:
                    best_inside[u] = (w, i, j)
    cut = {(group[u], group[v]) for u in range(k) for v, w in units.adjacency[u].items() if w == NEG_INF}
    anchored: dict = {}
    for u in range(k):
        if units.anchor[u] is not None:
            anchored[group[u]] = units.anchor[u]
    out = []
    for key, total in between.items():
        people_apart = key[0] in anchored and key[1] in anchored and anchored[key[0]] != anchored[key[1]]
        if key in best_pair and not people_apart and (key[0], key[1]) not in cut and (key[1], key[0]) not in cut:
            w, i, j = best_pair[key]
            flip = float(sigmoid(total))
            moves = min(size[key[0]], size[key[1]])
            out.append(Question(i, j, "merge", w, flip, moves, flip * moves))
    for u, (w, i, j) in best_inside.items():
        if units_in[group[u]] < 2:
            continue
        inside = sum(x for v, x in units.adjacency[u].items() if group[v] == group[u])
        flip = 1.0 - float(sigmoid(inside))
        moves = len(units.members[u])
        a, b = (i, j) if units.of[i] == u else (j, i)  # a: the detection whose place is in question
        out.append(Question(a, b, "split", w, flip, moves, flip * moves))
    out += verifications(graph, asked, reviewer_error)
    seen: set = set()
    ranked = []
    for q in sorted(out, key=lambda q: (-q.priority, -q.flip, q.a, q.b)):
        pair = (min(q.a, q.b), max(q.a, q.b))
        if q.flip < min_flip or pair in seen:
            continue
        seen.add(pair)
        ranked.append(q)
    return ranked


def verifications(graph: IdentityGraph, asked: set[tuple[int, int]], reviewer_error: float) -> list[Question]:
    """For each uncorroborated `same` (`graph.unconfirmed`), the question that would verify it: another pair
    of the two sides it joined (the sightings, or what other answers joined), the machine's likeliest, as a
    split question. The chance it changes the census is the chance the `same` was a slip: with the
    machine's P(same) p of the two sides (their strongest pair; 0.5 where it never compared them) and a
    reviewer wrong with probability e, e(1-p) / (e(1-p) + (1-e)p)."""
    if not graph.unconfirmed:
        return []
    uf = UnionFind(graph.n)
    loose = set(graph.unconfirmed)
    for i, j in graph.must:
        if (min(i, j), max(i, j)) not in loose:
            uf.union(i, j)
    sides = {(uf.find(i), uf.find(j)) for i, j in graph.unconfirmed}
    sides |= {(b, a) for a, b in sides}
    total: dict[tuple[int, int], float] = {}
    best: dict[tuple[int, int], tuple[float, int, int]] = {}
    for (i, j), w in graph.weights.items():
        key = (uf.find(i), uf.find(j))
        if key not in sides or not math.isfinite(w):
            continue
        key = tuple(sorted(key))
        total[key] = max(w, total.get(key, NEG_INF))  # the strongest pair, as between units
        if (i, j) not in asked and (key not in best or w > best[key][0]):
            best[key] = (w, i, j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(graph.n):
        members[uf.find(i)].append(i)
    out = []
    for i, j in graph.unconfirmed:
        key = tuple(sorted((uf.find(i), uf.find(j))))
        if key[0] == key[1]:
            continue
        if key in best:
            w, a, b = best[key]
        else:  # the machine never compared another pair of these sides: any pair not asked yet
            pair = next(((min(x, y), max(x, y)) for x in members[key[0]] for y in members[key[1]]
                         if (min(x, y), max(x, y)) not in asked), None)
            if pair is None:
                continue  # one photo each side, or every pair answered: nothing else to show
            w, (a, b) = 0.0, pair
        p = float(sigmoid(total.get(key, 0.0)))
        slip = reviewer_error * (1 - p)
        flip = slip / (slip + (1 - reviewer_error) * p) if slip > 0 else 0.0
        sizes = {uf.find(a): len(members[uf.find(a)]), uf.find(b): len(members[uf.find(b)])}
        if sizes[uf.find(b)] < sizes[uf.find(a)]:
            a, b = b, a  # a: the detection whose place is in question (the smaller side's)
        moves = min(sizes.values())
        out.append(Question(a, b, "split", w, flip, moves, flip * moves))
    return out


def sides(q: Question, ids: Sequence, labels: Sequence) -> tuple[str, str]:
    """What a question is about, side by side: two individuals (a merge), or one unit and its individual (a
    split). An answer settles every open question of its run about the same two sides."""
    def name(i: int) -> str:
        return f"individual:{labels[i]}" if labels[i] is not None else f"review:{ids[i]}"
    if q.kind == "split":
        return f"unit:{ids[q.a]}", name(q.a)
    return tuple(sorted((name(q.a), name(q.b))))


def stopping(ranked: Sequence[Question], stop_flip: float = 0.1) -> dict:
    """How much is left to ask: the questions whose answer has at least `stop_flip` chance of changing the
    census (the estimate a page shows), and the number of changes all of them are expected to make."""
    return {"questions_left": sum(1 for q in ranked if q.flip >= stop_flip),
            "expected_changes": round(sum(q.flip for q in ranked), 2), "stop_flip": stop_flip}
