"""Landmark graphs of a scheme for the model and the losses.

`message_graph(scheme)`: the L-GRN message-passing graph (scheme.edges symmetrised, self loops added; 470 entries for
WFLW-98, method.md §1.2). `laplacian_relations(scheme)`: the relative-location loss relations (§1.5).
"""
from __future__ import annotations

from functools import lru_cache

from structalign.landmarks import LandmarkScheme
from structalign.ops import LandmarkGraph, RelationSet


@lru_cache(maxsize=None)
def message_graph(scheme: LandmarkScheme) -> LandmarkGraph:
    """The scheme's undirected message-passing graph with self loops, shared by every model built for it."""
    return LandmarkGraph.from_edges(scheme.num_points, scheme.edges)


@lru_cache(maxsize=None)
def laplacian_relations(scheme: LandmarkScheme) -> RelationSet:
    """delta_i = mean of p_j over scheme.relation_neighbors[i], minus p_i (nodes without neighbours are skipped)."""
    return RelationSet.laplacian(scheme.relation_neighbors)
