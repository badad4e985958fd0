"""The landmark graph of a scheme for the model.

`message_graph(scheme)`: the L-GRN message-passing graph (scheme.edges symmetrised, self loops added; 470 entries for
WFLW-98, method.md §1.2). The relative-location loss's relations are structalign.losses.laplacian_relations.
"""
from __future__ import annotations

from functools import lru_cache

from structalign.landmarks import LandmarkScheme
from structalign.ops import LandmarkGraph


@lru_cache(maxsize=None)
def message_graph(scheme: LandmarkScheme) -> LandmarkGraph:
    """The scheme's undirected message-passing graph with self loops, shared by every model built for it."""
    return LandmarkGraph.from_edges(scheme.num_points, scheme.edges)
