"""Landmark schemes: point count, names, left/right flip table, normalising points and relation graphs.

A scheme is a YAML file (the shipped ones: structalign/schemes/{wflw98,300w68,cofw29}.yaml, from
method.md §1.2 graphs, §4.2 flip tables, §5 normalising points):

    name: my21                     # the scheme's name
    num_points: 21
    names: [chin, ...]             # optional, one per point
    flip_pairs: [[0, 4], ...]      # mirrored pairs; unlisted points map to themselves ([] when there are none)
    normalization:                 # each: two point groups, the distance between their centroids
      inter_ocular: [[6], [9]]
      inter_pupil: [[6, 7], [8, 9]]   # optional, defaults to inter_ocular
    graph:                         # the message-passing graph (symmetrised, self loops added), one of
      edges: [[0, 1], ...]         #   explicit undirected edges
      from: relations              #   each i -> j of the relations below
      knn: 3                       #   each point's k nearest points on the training mean shape (the paper's way)
    relations:                     # the relative-location loss relations (per point, its related points), one of
      neighbors: [[1, 2], ...]     #   explicit lists
      from: graph                  #   the graph's edges read i -> j (as the official LaplacianLoss does)
      knn: 3                       #   as above

`load_scheme(path, mean_shape)` reads and validates one; `LandmarkScheme.to_dict()` is its concrete content (every
derivation resolved), which a checkpoint carries so that it needs no file; `resolve_scheme` accepts a scheme, a
shipped name, a point count, a file path or such a dict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import yaml

from structalign.errors import StructalignError

SCHEME_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemes")
_KEYS = ("name", "num_points", "names", "flip", "flip_pairs", "normalization", "graph", "relations")


class SchemeError(StructalignError, ValueError):
    """A scheme file or value that is wrong; the message names the file and key."""


@dataclass(frozen=True)
class LandmarkScheme:
    """A landmark annotation convention.

    flip[i]: the index point i takes after a horizontal mirror; ocular, pupils: two point groups each, the
    inter-ocular and inter-pupil NME normalisers (distance between the groups' centroids); edges: the undirected
    message-passing graph; relation_neighbors: per-point related points of the relative-location loss (directed);
    names: one per point, or None.
    """

    name: str
    num_points: int
    flip: tuple
    ocular: tuple
    pupils: tuple
    edges: tuple
    relation_neighbors: tuple
    names: Optional[tuple] = None

    def flip_array(self) -> np.ndarray:
        return np.asarray(self.flip, dtype=np.int64)

    def to_dict(self) -> dict:
        """The scheme as scheme-file content with every derivation resolved (plain lists: YAML- and
        checkpoint-safe); scheme_from_dict(s.to_dict()) == s."""
        spec = {"name": self.name, "num_points": self.num_points}
        if self.names is not None:
            spec["names"] = list(self.names)
        spec["flip_pairs"] = [[i, j] for i, j in enumerate(self.flip) if i < j]
        spec["normalization"] = {"inter_ocular": [list(g) for g in self.ocular],
                                 "inter_pupil": [list(g) for g in self.pupils]}
        spec["graph"] = {"edges": [list(e) for e in self.edges]}
        spec["relations"] = {"neighbors": [list(n) for n in self.relation_neighbors]}
        return spec


def _index(value, n: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SchemeError(f"{where} = {value!r}: expected a point index")
    if not 0 <= value < n:
        raise SchemeError(f"{where} = {value}: index out of range [0, {n})")
    return int(value)


def _index_list(value, n: int, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise SchemeError(f"{where} = {value!r}: expected a list of point indices")
    return tuple(_index(v, n, f"{where}[{k}]") for k, v in enumerate(value))


def _groups(value, n: int, where: str) -> tuple:
    """Two point groups (each an index or a non-empty list of indices)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SchemeError(f"{where} = {value!r}: expected two point groups, e.g. [[60], [72]]")
    groups = []
    for k, g in enumerate(value):
        group = _index_list(g if isinstance(g, (list, tuple)) else [g], n, f"{where}[{k}]")
        if not group:
            raise SchemeError(f"{where}[{k}] is empty")
        groups.append(group)
    if groups[0] == groups[1]:
        raise SchemeError(f"{where}: both groups are {list(groups[0])}, so the distance is always zero")
    return tuple(groups)


def _flip(spec: dict, n: int, where: str) -> tuple:
    if ("flip" in spec) == ("flip_pairs" in spec):
        raise SchemeError(f"{where}: give exactly one of flip_pairs (mirrored pairs, [] for none) or flip (a table of "
                          f"{n} indices); `structalign data scheme` proposes flip pairs from a dataset's mean shape")
    if "flip" in spec:
        flip = _index_list(spec["flip"], n, f"{where}: flip")
        if len(flip) != n:
            raise SchemeError(f"{where}: flip has {len(flip)} entries, expected {n}")
        bad = next((i for i in range(n) if flip[flip[i]] != i), None)
        if bad is not None:
            raise SchemeError(f"{where}: flip is not an involution: point {bad} -> {flip[bad]} -> {flip[flip[bad]]}")
        return flip
    flip = list(range(n))
    pairs = spec["flip_pairs"]
    if not isinstance(pairs, (list, tuple)):
        raise SchemeError(f"{where}: flip_pairs = {pairs!r}: expected a list of [i, j] pairs")
    seen = {}
    for k, pair in enumerate(pairs):
        i, j = _pair(pair, n, f"{where}: flip_pairs[{k}]")
        for p in (i, j):
            if p in seen:
                raise SchemeError(f"{where}: flip_pairs[{k}] and flip_pairs[{seen[p]}] both move point {p}: the flip "
                                  f"would not be an involution")
            seen[p] = k
        flip[i], flip[j] = j, i
    return tuple(flip)


def _pair(value, n: int, where: str) -> tuple:
    pair = _index_list(value, n, where)
    if len(pair) != 2:
        raise SchemeError(f"{where} = {list(pair)}: expected two indices")
    if pair[0] == pair[1]:
        raise SchemeError(f"{where} = {list(pair)}: a point paired with itself")
    return pair


def _derivation(section, allowed: tuple, where: str):
    """(kind, value) of a graph/relations section: exactly one of its allowed keys."""
    if not isinstance(section, dict) or len(section) != 1 or next(iter(section)) not in allowed:
        raise SchemeError(f"{where} = {section!r}: expected exactly one of {', '.join(allowed)}")
    return next(iter(section.items()))


def knn_neighbors(mean_shape, k: int = 3) -> tuple:
    """Each point's k nearest other points on mean_shape (array[N, 2]), nearest first; ties by lower index."""
    shape = _check_mean_shape(mean_shape)
    n = shape.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise SchemeError(f"k must be an int in [1, {n - 1}] for {n} points, got {k!r}")
    dist = np.linalg.norm(shape[:, None] - shape[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return tuple(tuple(int(j) for j in row) for row in order)


def _check_mean_shape(mean_shape) -> np.ndarray:
    shape = np.asarray(mean_shape, dtype=np.float64)
    if shape.ndim != 2 or shape.shape[1] != 2 or shape.shape[0] < 2:
        raise SchemeError(f"mean_shape must have shape [N, 2] with N >= 2, got {list(shape.shape)}")
    if not np.isfinite(shape).all():
        point = int(np.argwhere(~np.isfinite(shape))[0, 0])
        raise SchemeError(f"mean_shape has NaN or infinite coordinates at point {point}")
    return shape


def _knn(k, n: int, mean_shape, where: str) -> tuple:
    if mean_shape is None:
        raise SchemeError(f"{where}: knn needs the training mean shape; the scheme is resolved when a dataset is "
                          f"opened (training), and a checkpoint carries the resolved graph")
    shape = _check_mean_shape(mean_shape)
    if shape.shape[0] != n:
        raise SchemeError(f"{where}: mean shape has {shape.shape[0]} points, the scheme {n}")
    try:
        return knn_neighbors(shape, k)
    except SchemeError as exc:
        raise SchemeError(f"{where}: {exc}") from None


def scheme_from_dict(spec: dict, source: str = "scheme", mean_shape=None) -> LandmarkScheme:
    """A validated LandmarkScheme from scheme-file content (see the module docstring); mean_shape (array[N, 2]) is
    needed only by knn derivations. Errors name `source` and the key."""
    if not isinstance(spec, dict):
        raise SchemeError(f"{source}: expected a mapping of scheme keys, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise SchemeError(f"{source}: unknown key(s) {unknown}; known: {list(_KEYS)}")
    for key in ("name", "num_points", "normalization", "graph", "relations"):
        if key not in spec:
            raise SchemeError(f"{source}: missing key {key!r}")
    name, n = spec["name"], spec["num_points"]
    if not isinstance(name, str) or not name:
        raise SchemeError(f"{source}: name = {name!r}: expected a non-empty string")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SchemeError(f"{source}: num_points = {n!r}: expected an int >= 2")
    names = spec.get("names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(s, str) for s in names):
            raise SchemeError(f"{source}: names must be a list of {n} strings")
        if len(set(names)) != n:
            raise SchemeError(f"{source}: names are not unique: {sorted({s for s in names if names.count(s) > 1})}")
        names = tuple(names)
    flip = _flip(spec, n, source)
    norm = spec["normalization"]
    if not isinstance(norm, dict) or "inter_ocular" not in norm or set(norm) - {"inter_ocular", "inter_pupil"}:
        raise SchemeError(f"{source}: normalization needs inter_ocular (and optionally inter_pupil), got {norm!r}")
    ocular = _groups(norm["inter_ocular"], n, f"{source}: normalization.inter_ocular")
    pupils = _groups(norm.get("inter_pupil", norm["inter_ocular"]), n, f"{source}: normalization.inter_pupil")

    graph_kind, graph_value = _derivation(spec["graph"], ("edges", "from", "knn"), f"{source}: graph")
    rel_kind, rel_value = _derivation(spec["relations"], ("neighbors", "from", "knn"), f"{source}: relations")
    if graph_kind == "from" and graph_value != "relations":
        raise SchemeError(f"{source}: graph.from = {graph_value!r}: only 'relations' is possible")
    if rel_kind == "from" and rel_value != "graph":
        raise SchemeError(f"{source}: relations.from = {rel_value!r}: only 'graph' is possible")
    if graph_kind == "from" and rel_kind == "from":
        raise SchemeError(f"{source}: graph and relations are each derived from the other; give one explicitly")

    edges = neighbors = None
    if graph_kind == "edges":
        if not isinstance(graph_value, (list, tuple)) or not graph_value:
            raise SchemeError(f"{source}: graph.edges must be a non-empty list of [i, j] pairs")
        edges = tuple(_pair(e, n, f"{source}: graph.edges[{k}]") for k, e in enumerate(graph_value))
    elif graph_kind == "knn":
        edges = tuple((i, j) for i, js in enumerate(_knn(graph_value, n, mean_shape, f"{source}: graph.knn"))
                      for j in js)
    if rel_kind == "neighbors":
        if not isinstance(rel_value, (list, tuple)) or len(rel_value) != n:
            raise SchemeError(f"{source}: relations.neighbors must hold one list per point ({n})")
        neighbors = tuple(_index_list(v, n, f"{source}: relations.neighbors[{i}]") for i, v in enumerate(rel_value))
        for i, row in enumerate(neighbors):
            if i in row:
                raise SchemeError(f"{source}: relations.neighbors[{i}] relates point {i} to itself")
    elif rel_kind == "knn":
        neighbors = _knn(rel_value, n, mean_shape, f"{source}: relations.knn")
    if edges is None:
        edges = tuple((i, j) for i, js in enumerate(neighbors) for j in js)
    if neighbors is None:
        lists = [[] for _ in range(n)]
        for i, j in edges:
            lists[i].append(j)
        neighbors = tuple(tuple(x) for x in lists)
    touched = {p for e in edges for p in e}
    lonely = [p for p in range(n) if p not in touched]
    if lonely:
        raise SchemeError(f"{source}: graph node(s) {lonely} have no edge: every landmark needs a neighbour to pass "
                          f"messages with")
    return LandmarkScheme(name=name, num_points=n, flip=flip, ocular=ocular, pupils=pupils, edges=edges,
                          relation_neighbors=neighbors, names=names)


def _read_spec(path: str) -> dict:
    if not os.path.isfile(path):
        raise SchemeError(f"scheme file {path!r} does not exist")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SchemeError(f"scheme file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_scheme(path: str, mean_shape=None) -> LandmarkScheme:
    """A scheme file (YAML) read and validated; mean_shape (array[N, 2]) resolves knn derivations."""
    return scheme_from_dict(_read_spec(path), source=path, mean_shape=mean_shape)


def scheme_yaml(scheme, header: str = "") -> str:
    """Scheme-file text for a LandmarkScheme (every derivation written out) or scheme-file content (a dict, written
    as given), with header as comment lines on top."""
    spec = scheme.to_dict() if isinstance(scheme, LandmarkScheme) else scheme
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=118)


def propose_flip(mean_shape) -> tuple:
    """The flip table (tuple[N]) pairing each point of mean_shape (array[N, 2], image coordinates) with the point
    nearest its horizontal mirror about the shape's centre: an optimal assignment (scipy), made an involution. A point
    maps to itself where its match is not mutual or lies farther from the mirror image than the median distance
    between neighbouring points (nothing there mirrors it)."""
    from scipy.optimize import linear_sum_assignment

    shape = _check_mean_shape(mean_shape)
    mirrored = shape.copy()
    mirrored[:, 0] = 2 * shape[:, 0].mean() - shape[:, 0]
    cost = np.linalg.norm(shape[:, None] - mirrored[None], axis=-1)
    _, match = linear_sum_assignment(cost)
    spacing = np.median(np.sort(np.linalg.norm(shape[:, None] - shape[None], axis=-1), axis=1)[:, 1])
    return tuple(int(j) if match[j] == i and cost[i, j] <= spacing else i for i, j in enumerate(match))


def propose_scheme(name: str, mean_shape, k: int = 3) -> tuple[dict, list[str]]:
    """A scheme-file spec for a landmark set that has none, from its mean shape (array[N, 2], image coordinates):
    flip pairs from propose_flip, the paper's graph (k nearest points), and a guessed normaliser (the widest mirrored
    pair; the nearest two points when nothing mirrors). Returns (spec, notes): the notes say what to review."""
    shape = _check_mean_shape(mean_shape)
    n = shape.shape[0]
    flip = propose_flip(shape)
    pairs = [[i, j] for i, j in enumerate(flip) if i < j]
    notes = [f"flip_pairs: {len(pairs)} mirrored pairs proposed from the mirrored mean shape; "
             f"{n - 2 * len(pairs)} points map to themselves"]
    if pairs:
        i, j = max(pairs, key=lambda p: abs(shape[p[0], 0] - shape[p[1], 0]))
        notes.append(f"normalization: inter_ocular guessed as the widest mirrored pair ({i}, {j}); set your outer eye "
                     f"corners (and pupil groups) instead")
    else:
        dist = np.linalg.norm(shape[:, None] - shape[None], axis=-1)
        i, j = (int(v) for v in np.unravel_index(np.argmax(dist), dist.shape))
        notes.append(f"normalization: no mirrored pairs; inter_ocular guessed as the farthest pair ({i}, {j})")
    spec = {"name": name, "num_points": n, "flip_pairs": pairs,
            "normalization": {"inter_ocular": [[int(i)], [int(j)]]},
            "graph": {"from": "relations"}, "relations": {"knn": min(k, n - 1)}}
    scheme_from_dict(spec, source=f"proposed scheme {name}", mean_shape=shape)
    return spec, notes


def _is_path(scheme) -> bool:
    return isinstance(scheme, str) and (scheme.endswith((".yaml", ".yml")) or os.sep in scheme)


def needs_mean_shape(scheme) -> bool:
    """Whether scheme (as resolve_scheme takes it) derives its graph or relations from a mean shape (knn)."""
    spec = _read_spec(scheme) if _is_path(scheme) else scheme
    return isinstance(spec, dict) and any(isinstance(spec.get(k), dict) and "knn" in spec[k]
                                          for k in ("graph", "relations"))


def provisional_scheme(scheme) -> LandmarkScheme:
    """A scheme file or content whose knn derivations are resolved on stand-in points: its point count, names, flip
    and normalisers are final, its graph is not (resolve it again on the data's mean shape)."""
    source = scheme if _is_path(scheme) else "scheme"
    spec = _read_spec(scheme) if _is_path(scheme) else scheme
    n = spec.get("num_points") if isinstance(spec, dict) else None
    ring = None
    if isinstance(n, int) and not isinstance(n, bool) and n >= 2:
        angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
        ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return scheme_from_dict(spec, source=source, mean_shape=ring)


@lru_cache(maxsize=None)
def placeholder_scheme(num_points: int) -> LandmarkScheme:
    """A stand-in for a landmark set without a scheme yet (reading its data to propose one): no flips, a chain."""
    return LandmarkScheme(name=f"unnamed{num_points}", num_points=num_points, flip=tuple(range(num_points)),
                          ocular=((0,), (num_points - 1,)), pupils=((0,), (num_points - 1,)),
                          edges=tuple((i, i + 1) for i in range(num_points - 1)),
                          relation_neighbors=tuple((i + 1,) for i in range(num_points - 1)) + ((),))

SCHEMES = {name: load_scheme(os.path.join(SCHEME_DIR, f"{name}.yaml")) for name in ("wflw98", "300w68", "cofw29")}
WFLW98, IBUG68, COFW29 = SCHEMES["wflw98"], SCHEMES["300w68"], SCHEMES["cofw29"]
_BY_COUNT = {s.num_points: s for s in SCHEMES.values()}


def scheme_for(key) -> LandmarkScheme:
    """A shipped scheme by name ("wflw98", "300w68", "cofw29") or by point count (98, 68, 29)."""
    found = SCHEMES.get(key) if isinstance(key, str) else _BY_COUNT.get(int(key))
    if found is None:
        raise SchemeError(f"no landmark scheme {key!r}; known: {sorted(SCHEMES)} or point counts {sorted(_BY_COUNT)}, "
                          f"or give a scheme file (.yaml)")
    return found


def resolve_scheme(scheme, mean_shape=None) -> LandmarkScheme:
    """A LandmarkScheme from itself, scheme-file content (dict), a scheme file path (.yaml/.yml), a shipped name or
    a point count; mean_shape (array[N, 2]) resolves knn derivations of a file or dict."""
    if isinstance(scheme, LandmarkScheme):
        return scheme
    if isinstance(scheme, dict):
        return scheme_from_dict(scheme, mean_shape=mean_shape)
    if _is_path(scheme):
        return load_scheme(scheme, mean_shape=mean_shape)
    return scheme_for(scheme)
