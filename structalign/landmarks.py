"""Landmark schemes: point count, left/right flip table, normalising points and relation graphs.

One `LandmarkScheme` per annotation convention (WFLW 98, 300W 68, COFW 29), from ../shared/reference/method.md
§1.2 (graphs), §4.2 (flip tables) and §5 (normalising points). The data layer uses the flip tables, the metrics the
normalising points, the model and losses the graphs.
"""
from dataclasses import dataclass, field

import numpy as np

# WFLW 98-point top-3 related landmarks, verbatim from the official 98pts_top3.txt (descending similarity).
WFLW_TOP3 = (
    (1, 2, 3), (0, 2, 3), (1, 3, 0), (2, 4, 1), (3, 5, 2), (4, 6, 3), (7, 5, 8), (6, 8, 5),
    (7, 9, 6), (8, 10, 7), (9, 11, 8), (10, 12, 9), (11, 10, 13), (12, 14, 11), (15, 13, 16), (16, 14, 17),
    (15, 17, 14), (16, 18, 15), (17, 19, 16), (20, 18, 21), (21, 22, 19), (22, 20, 23), (23, 21, 24), (24, 22, 25),
    (25, 23, 26), (24, 26, 23), (25, 27, 24), (28, 26, 29), (29, 27, 30), (30, 28, 31), (31, 29, 32), (32, 30, 29),
    (31, 30, 29), (41, 34, 40), (41, 35, 40), (40, 36, 39), (39, 37, 35), (38, 36, 39), (37, 39, 36), (36, 38, 40),
    (35, 39, 41), (34, 40, 35), (50, 43, 49), (49, 42, 44), (48, 43, 49), (47, 44, 48), (47, 45, 48), (45, 48, 44),
    (44, 49, 43), (43, 50, 48), (42, 49, 43), (52, 53, 68), (53, 51, 54), (54, 52, 57), (53, 57, 56), (56, 57, 58),
    (57, 55, 58), (56, 58, 54), (57, 59, 56), (58, 57, 56), (67, 61, 66), (62, 60, 67), (61, 63, 96), (62, 64, 65),
    (65, 63, 66), (66, 64, 67), (65, 67, 96), (66, 60, 65), (75, 69, 74), (70, 68, 75), (71, 69, 97), (70, 72, 73),
    (73, 71, 74), (74, 72, 71), (75, 73, 97), (74, 68, 73), (88, 87, 77), (89, 78, 90), (79, 90, 80), (78, 80, 90),
    (79, 90, 78), (91, 80, 90), (92, 83, 81), (93, 84, 92), (85, 93, 94), (94, 84, 86), (85, 95, 94), (95, 86, 88),
    (76, 87, 77), (77, 90, 78), (79, 80, 78), (81, 90, 80), (82, 83, 81), (84, 94, 83), (85, 86, 84), (86, 94, 87),
    (62, 61, 63), (70, 71, 69),
)

# 300W 68-point hand-designed graph (official 68pts.txt, undirected).
IBUG68_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (5, 48), (6, 7), (6, 59), (7, 8),
    (7, 58), (8, 9), (8, 57), (9, 10), (9, 56), (10, 11), (10, 55), (11, 12), (11, 54), (12, 13),
    (13, 14), (14, 15), (15, 16), (48, 49), (48, 60), (48, 59), (59, 58), (58, 57), (58, 67), (57, 56),
    (57, 66), (56, 55), (56, 65), (55, 64), (55, 54), (60, 67), (67, 66), (66, 65), (65, 64), (64, 54),
    (60, 61), (60, 49), (61, 50), (61, 62), (62, 51), (62, 63), (63, 52), (63, 64), (64, 53), (49, 50),
    (50, 51), (51, 52), (52, 53), (53, 54), (49, 31), (50, 32), (51, 33), (52, 34), (53, 35), (31, 32),
    (32, 33), (35, 34), (34, 33), (27, 28), (28, 29), (29, 30), (30, 33), (22, 27), (21, 27), (16, 26),
    (26, 25), (25, 24), (24, 23), (23, 22), (25, 45), (24, 44), (23, 43), (22, 42), (45, 44), (44, 43),
    (43, 42), (45, 46), (46, 47), (47, 42), (0, 17), (17, 18), (18, 19), (19, 20), (20, 21), (18, 36),
    (19, 37), (20, 38), (21, 39), (36, 37), (37, 38), (38, 39), (39, 40), (40, 41), (41, 36),
)

# COFW 29-point hand-designed graph (official 29pts.txt, undirected).
COFW29_EDGES = (
    (0, 4), (4, 2), (2, 5), (5, 0), (4, 5), (8, 12), (12, 10), (10, 13), (13, 8), (16, 8),
    (16, 12), (16, 10), (16, 13), (0, 8), (5, 12), (2, 10), (3, 6), (6, 1), (1, 7), (7, 3),
    (7, 6), (3, 11), (7, 14), (1, 9), (11, 14), (14, 9), (9, 15), (15, 11), (17, 11), (17, 14),
    (17, 9), (17, 15), (2, 3), (10, 11), (10, 20), (11, 20), (20, 21), (21, 18), (21, 19), (18, 20),
    (19, 20), (21, 24), (22, 24), (23, 24), (22, 25), (23, 25), (24, 25), (22, 26), (22, 27), (26, 23),
    (27, 23), (27, 28),
)

WFLW_FLIP = (
    32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
    12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 46, 45, 44, 43, 42, 50, 49,
    48, 47, 37, 36, 35, 34, 33, 41, 40, 39, 38, 51, 52, 53, 54, 59, 58, 57, 56, 55,
    72, 71, 70, 69, 68, 75, 74, 73, 64, 63, 62, 61, 60, 67, 66, 65, 82, 81, 80, 79,
    78, 77, 76, 87, 86, 85, 84, 83, 92, 91, 90, 89, 88, 95, 94, 93, 97, 96,
)
IBUG68_FLIP = (
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24,
    23, 22, 21, 20, 19, 18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42,
    47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
    64, 63, 62, 61, 60, 67, 66, 65,
)
COFW29_FLIP = (
    1, 0, 3, 2, 6, 7, 4, 5, 9, 8, 11, 10, 14, 15, 12, 13, 17, 16, 19, 18,
    20, 21, 23, 22, 24, 25, 26, 27, 28,
)


@dataclass(frozen=True)
class LandmarkScheme:
    """A landmark annotation convention.

    flip[i]: the index point i takes after a horizontal mirror; ocular (i, j): outer eye corners, the inter-ocular
    NME normaliser; pupils: two index groups whose centroids give the inter-pupil distance; edges: the undirected
    message-passing graph; relation_neighbors: per-point related points of the relative-location loss (directed).
    """

    name: str
    num_points: int
    flip: tuple
    ocular: tuple
    pupils: tuple
    edges: tuple
    relation_neighbors: tuple = field(repr=False)

    def flip_array(self) -> np.ndarray:
        return np.asarray(self.flip, dtype=np.int64)


def _out_neighbors(num_points: int, edges) -> tuple:
    """Directed out-neighbour lists of a hand-made graph, as the official LaplacianLoss reads it (i -> j)."""
    lists = [[] for _ in range(num_points)]
    for i, j in edges:
        lists[i].append(j)
    return tuple(tuple(x) for x in lists)


WFLW98 = LandmarkScheme(
    name="wflw98", num_points=98, flip=WFLW_FLIP, ocular=(60, 72), pupils=((96,), (97,)),
    edges=tuple((i, j) for i, js in enumerate(WFLW_TOP3) for j in js), relation_neighbors=WFLW_TOP3,
)
IBUG68 = LandmarkScheme(
    name="300w68", num_points=68, flip=IBUG68_FLIP, ocular=(36, 45),
    pupils=(tuple(range(36, 42)), tuple(range(42, 48))), edges=IBUG68_EDGES,
    relation_neighbors=_out_neighbors(68, IBUG68_EDGES),
)
COFW29 = LandmarkScheme(
    name="cofw29", num_points=29, flip=COFW29_FLIP, ocular=(8, 9), pupils=((16,), (17,)), edges=COFW29_EDGES,
    relation_neighbors=_out_neighbors(29, COFW29_EDGES),
)

SCHEMES = {s.name: s for s in (WFLW98, IBUG68, COFW29)}
_BY_COUNT = {s.num_points: s for s in SCHEMES.values()}


def scheme_for(key) -> LandmarkScheme:
    """The scheme by name ("wflw98", "300w68", "cofw29") or by point count (98, 68, 29)."""
    found = SCHEMES.get(key) if isinstance(key, str) else _BY_COUNT.get(int(key))
    if found is None:
        raise ValueError(f"no landmark scheme {key!r}; known: {sorted(SCHEMES)} or point counts {sorted(_BY_COUNT)}")
    return found
