"""Landmark graphs of a scheme for the model and the losses, and a scheme builder for custom landmark sets.

`message_graph(scheme)`: the L-GRN message-passing graph (scheme.edges symmetrised, self loops added; 470 entries for
WFLW-98, method.md §1.2). `laplacian_relations(scheme)`: the relative-location loss relations (§1.5).
`scheme_from_mean_shape(...)`: a LandmarkScheme for any other annotation convention, its graph and relations being
each point's k nearest points on a mean shape.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from structalign.landmarks import LandmarkScheme, scheme_for
from structalign.ops import LandmarkGraph, RelationSet


def resolve_scheme(scheme) -> LandmarkScheme:
    """A LandmarkScheme from itself, a name ("wflw98", "300w68", "cofw29") or a point count (98, 68, 29)."""
    return scheme if isinstance(scheme, LandmarkScheme) else scheme_for(scheme)


@lru_cache(maxsize=None)
def message_graph(scheme: LandmarkScheme) -> LandmarkGraph:
    """The scheme's undirected message-passing graph with self loops, shared by every model built for it."""
    return LandmarkGraph.from_edges(scheme.num_points, scheme.edges)


@lru_cache(maxsize=None)
def laplacian_relations(scheme: LandmarkScheme) -> RelationSet:
    """delta_i = mean of p_j over scheme.relation_neighbors[i], minus p_i (nodes without neighbours are skipped)."""
    return RelationSet.laplacian(scheme.relation_neighbors)


def _check_mean_shape(mean_shape) -> np.ndarray:
    shape = np.asarray(mean_shape, dtype=np.float64)
    if shape.ndim != 2 or shape.shape[1] != 2 or shape.shape[0] < 2:
        raise ValueError(f"mean_shape must have shape [N, 2] with N >= 2, got {list(shape.shape)}")
    if not np.isfinite(shape).all():
        point = int(np.argwhere(~np.isfinite(shape))[0, 0])
        raise ValueError(f"mean_shape has NaN or infinite coordinates at point {point}")
    return shape


def knn_neighbors(mean_shape, k: int = 3) -> tuple:
    """Each point's k nearest other points on mean_shape (array[N, 2]), nearest first; ties by lower index."""
    shape = _check_mean_shape(mean_shape)
    n = shape.shape[0]
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int in [1, {n - 1}] for {n} points, got {k!r}")
    dist = np.linalg.norm(shape[:, None] - shape[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return tuple(tuple(int(j) for j in row) for row in order)


def scheme_from_mean_shape(name: str, mean_shape, flip, ocular, pupils=None, k: int = 3) -> LandmarkScheme:
    """A LandmarkScheme for a custom landmark set: graph and relations = k nearest points on mean_shape.

    mean_shape (array[N, 2]); flip (N indices: the point each one becomes after a horizontal mirror); ocular (i, j)
    the normalising pair; pupils: two index groups (defaults to ((i,), (j,)) of ocular).
    """
    shape = _check_mean_shape(mean_shape)
    n = shape.shape[0]
    flip = tuple(int(v) for v in flip)
    if sorted(flip) != list(range(n)):
        raise ValueError(f"flip must be a permutation of range({n}), got {len(flip)} entries {flip[:8]}...")
    if any(flip[flip[i]] != i for i in range(n)):
        bad = next(i for i in range(n) if flip[flip[i]] != i)
        raise ValueError(f"flip must be its own inverse: point {bad} -> {flip[bad]} -> {flip[flip[bad]]}")
    ocular = tuple(int(v) for v in ocular)
    if len(ocular) != 2 or not all(0 <= v < n for v in ocular) or ocular[0] == ocular[1]:
        raise ValueError(f"ocular must be two different point indices in [0, {n}), got {ocular}")
    pupils = ((ocular[0],), (ocular[1],)) if pupils is None else tuple(tuple(int(v) for v in g) for g in pupils)
    if len(pupils) != 2 or not all(g and all(0 <= v < n for v in g) for g in pupils):
        raise ValueError(f"pupils must be two non-empty groups of point indices in [0, {n}), got {pupils}")
    neighbors = knn_neighbors(shape, k)
    edges = tuple((i, j) for i, js in enumerate(neighbors) for j in js)
    return LandmarkScheme(name=name, num_points=n, flip=flip, ocular=ocular, pupils=pupils, edges=edges,
                          relation_neighbors=neighbors)
