"""Sparse landmark relations used by the ops, validated once at construction.

LandmarkGraph  the message-passing graph: compressed rows (CSR) over N nodes, every row holding its self loop.
RelationSet    the relative-location relations: delta_r = sum_m w_m p[member_m] - p[anchor_r] for r < R.

Both keep their index tensors on the CPU and hand out cached copies per device (`tensors(device)`, and the
transposed indices the fused backwards gather over: `LandmarkGraph.transposed`, `RelationSet.by_point`), so a model
can hold one object and call the ops on any device without re-validating, re-transposing or re-copying.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


def _as_index(name: str, value) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64).contiguous()


def _check_indptr(name: str, indptr: torch.Tensor, rows: int, total: int) -> None:
    if indptr.dim() != 1 or indptr.numel() != rows + 1:
        raise ValueError(f"{name} must have shape [{rows + 1}], got {list(indptr.shape)}")
    if indptr[0].item() != 0 or indptr[-1].item() != total:
        raise ValueError(f"{name} must start at 0 and end at {total}, got {indptr[0].item()}..{indptr[-1].item()}")
    if (indptr[1:] < indptr[:-1]).any():
        raise ValueError(f"{name} must be non-decreasing")


def _canonical_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _DeviceCache:
    """Per-device (and, for floating tensors, per-dtype) copies of fixed groups of CPU tensors, made on first use."""

    def _init_cache(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _copies(self, group: str, cpu: tuple, device, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        key = (group, _canonical_device(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device=key[1], dtype=dtype if t.is_floating_point() else None)
                                     for t in cpu)
        return self._cache[key]


class LandmarkGraph(_DeviceCache):
    """Neighbourhood of each landmark for `graph_message_passing`, in compressed-row form.

    indptr (Tensor[N + 1]) and indices (Tensor[E]): row i's neighbours are indices[indptr[i]:indptr[i + 1]]; every
    row holds i itself exactly once (the self loop) and no neighbour twice. Edge e carries logits[..., e].
    """

    def __init__(self, indptr, indices):
        indptr, indices = _as_index("indptr", indptr), _as_index("indices", indices)
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {list(indices.shape)}")
        n = indptr.numel() - 1
        if n < 1:
            raise ValueError("a LandmarkGraph needs at least one node")
        _check_indptr("indptr", indptr, n, indices.numel())
        if indices.numel() and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0].item()
            raise ValueError(f"indices holds node {bad}, outside [0, {n})")
        rows = torch.repeat_interleave(torch.arange(n), indptr.diff())
        empty = (indptr.diff() == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"node {empty[0].item()} has no entry (every row needs at least its self loop)")
        self_count = torch.zeros(n, dtype=torch.int64).index_add_(0, rows, (indices == rows).long())
        if (self_count != 1).any():
            i = (self_count != 1).nonzero()[0].item()
            raise ValueError(f"node {i} has {self_count[i].item()} self loops; each row needs exactly one")
        keys = rows * n + indices
        if keys.unique().numel() != keys.numel():
            raise ValueError("a row lists the same neighbour twice")
        self.num_nodes, self.num_edges = n, indices.numel()
        self.indptr, self.indices, self.rows = indptr, indices, rows
        # The transposed graph (for the backward's gather of grad h_nbr): node j's incoming edges, ascending.
        in_count = torch.bincount(indices, minlength=n)
        self.in_ptr = torch.cat([in_count.new_zeros(1), in_count.cumsum(0)])
        self.in_edges = torch.argsort(indices, stable=True)
        self.max_deg, self.max_in_deg = int(indptr.diff().max()), int(in_count.max())
        self._init_cache()

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(indptr Tensor[N + 1], indices Tensor[E]), int64 on `device`."""
        return self._copies("csr", (self.indptr, self.indices), device)

    def transposed(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in_ptr Tensor[N + 1], in_edges Tensor[E], edge_row Tensor[E]), int64 on `device`: node j's incoming
        edges are in_edges[in_ptr[j]:in_ptr[j + 1]] (ascending edge ids), edge e runs from row edge_row[e]."""
        return self._copies("transposed", (self.in_ptr, self.in_edges, self.rows), device)

    @classmethod
    def from_edges(cls, num_nodes: int, edges: Iterable[Sequence[int]], symmetric: bool = True) -> "LandmarkGraph":
        """Graph from (i, j) pairs: symmetrised unless `symmetric=False`, self loops added, rows sorted."""
        rows: list[set[int]] = [{i} for i in range(num_nodes)]
        for edge in edges:
            i, j = (int(v) for v in edge)
            for v in (i, j):
                if not 0 <= v < num_nodes:
                    raise ValueError(f"edge ({i}, {j}) names node {v}, outside [0, {num_nodes})")
            rows[i].add(j)
            if symmetric:
                rows[j].add(i)
        indptr = [0]
        indices: list[int] = []
        for row in rows:
            indices.extend(sorted(row))
            indptr.append(len(indices))
        return cls(torch.tensor(indptr), torch.tensor(indices))

    def dense_mask(self) -> torch.Tensor:
        """Bool Tensor[N, N], True where row i lists j (self loops included)."""
        mask = torch.zeros(self.num_nodes, self.num_nodes, dtype=torch.bool)
        mask[self.rows, self.indices] = True
        return mask

    def __repr__(self) -> str:
        return f"LandmarkGraph(num_nodes={self.num_nodes}, num_edges={self.num_edges})"


class RelationSet(_DeviceCache):
    """Relations for `relative_location_loss`: delta_r(P) = sum_{m in r} weight[m] * P[member[m]] - P[anchor[r]].

    anchor (Tensor[R]), indptr (Tensor[R + 1]), member (Tensor[M]), weight (Tensor[M], kept in float64 and handed
    to the ops in their accumulation dtype). Build with `laplacian` (the paper's loss: mean of k related landmarks
    minus the landmark) or `pairs` (p_j - p_i).
    """

    def __init__(self, num_points: int, anchor, indptr, member, weight):
        anchor, indptr, member = _as_index("anchor", anchor), _as_index("indptr", indptr), _as_index("member", member)
        weight = torch.as_tensor(weight, dtype=torch.float64).contiguous()
        if anchor.dim() != 1 or anchor.numel() == 0:
            raise ValueError(f"anchor must be a non-empty 1-D tensor, got shape {list(anchor.shape)}")
        r = anchor.numel()
        _check_indptr("indptr", indptr, r, member.numel())
        if weight.shape != member.shape:
            raise ValueError(f"weight must match member's shape {list(member.shape)}, got {list(weight.shape)}")
        for name, idx in (("anchor", anchor), ("member", member)):
            if idx.numel() and (idx.min() < 0 or idx.max() >= num_points):
                bad = idx[(idx < 0) | (idx >= num_points)][0].item()
                raise ValueError(f"{name} holds landmark {bad}, outside [0, {num_points})")
        empty = (indptr.diff() == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"relation {empty[0].item()} (anchor {anchor[empty[0]].item()}) has no member")
        owner = torch.repeat_interleave(torch.arange(r), indptr.diff())
        if (member == anchor[owner]).any():
            k = (member == anchor[owner]).nonzero()[0].item()
            raise ValueError(f"relation {owner[k].item()} lists its anchor {member[k].item()} as a member")
        self.num_points, self.num_relations, self.num_members = num_points, r, member.numel()
        self.anchor, self.indptr, self.member, self.weight = anchor, indptr, member, weight
        # The transposed index: landmark j's entries (relation, coefficient), -1 as an anchor and +w as a member,
        # sorted by landmark then relation, so a gradient is a fixed-order gather per landmark.
        point = torch.cat([anchor, member])
        rel = torch.cat([torch.arange(r), owner])
        coef = torch.cat([-torch.ones(r, dtype=torch.float64), weight])
        order = torch.argsort(point * r + rel, stable=True)
        count = torch.bincount(point, minlength=num_points)
        self.point_ptr = torch.cat([count.new_zeros(1), count.cumsum(0)])
        self.point_rel, self.point_coef = rel[order], coef[order]
        self.max_point_entries = int(count.max())
        self._init_cache()

    def tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
        """(anchor Tensor[R], indptr Tensor[R + 1], member Tensor[M], weight Tensor[M]) on `device`, indices int64,
        weight in `dtype` (the ops' accumulation dtype: float64 for float64 inputs, else float32)."""
        return self._copies("relations", (self.anchor, self.indptr, self.member, self.weight), device, dtype)

    def by_point(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
        """(point_ptr Tensor[N + 1], point_rel Tensor[T], point_coef Tensor[T]) on `device`: landmark j's entries are
        point_ptr[j]:point_ptr[j + 1], relation point_rel[t] uses it with coefficient point_coef[t] (in `dtype`)."""
        return self._copies("by_point", (self.point_ptr, self.point_rel, self.point_coef), device, dtype)

    @classmethod
    def laplacian(cls, neighbors: Sequence[Sequence[int]]) -> "RelationSet":
        """delta_i = mean_{j in K(i)} p_j - p_i for every node i with a non-empty list (directed, method.md §1.5).

        Nodes with an empty list are not anchors (the official code would add an absolute term -p_i for them).
        """
        anchor, indptr, member, weight = [], [0], [], []
        for i, js in enumerate(neighbors):
            js = [int(j) for j in js]
            if not js:
                continue
            anchor.append(i)
            member.extend(js)
            weight.extend([1.0 / len(js)] * len(js))
            indptr.append(len(member))
        if not anchor:
            raise ValueError("laplacian relations need at least one node with a neighbour")
        return cls(len(neighbors), torch.tensor(anchor), torch.tensor(indptr), torch.tensor(member), weight)

    @classmethod
    def pairs(cls, num_points: int, pairs=None) -> "RelationSet":
        """delta_ij = p_j - p_i for the given (i, j) pairs (Tensor[P, 2] or list), or all i < j when None."""
        if pairs is None:
            pairs = torch.triu_indices(num_points, num_points, offset=1).T
        pairs = _as_index("pairs", pairs)
        if pairs.dim() != 2 or pairs.shape[1] != 2:
            raise ValueError(f"pairs must have shape [P, 2], got {list(pairs.shape)}")
        p = pairs.shape[0]
        return cls(num_points, pairs[:, 0], torch.arange(p + 1), pairs[:, 1], torch.ones(p))

    def __repr__(self) -> str:
        return f"RelationSet(num_points={self.num_points}, num_relations={self.num_relations})"
