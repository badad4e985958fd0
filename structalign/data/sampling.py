"""Which dataset items an epoch visits, in what order, on which shard, with optional pose-based data balancing.

The order of epoch e is a pure function of (seed, e); a sample's position in that order (before sharding) is what
its augmentation draws are keyed on, so a shard or a resumed epoch sees exactly what an uninterrupted run sees.
"""
import numpy as np

from structalign.data.records import DatasetError

_ORDER_STREAM = 0x0DE5


def pose_balance_repeats(landmarks: np.ndarray, bins: int = 9) -> np.ndarray:
    """PDB (method.md §1.6): how often (int64[n]) each shape of landmarks (float[n, N, 2]) is repeated per epoch.

    Shapes are aligned to their mean by a similarity transform; the absolute projection on the first principal
    component is histogrammed into `bins` bins, and a sample in a bin of count c is repeated round(max count / c)
    times, so rare poses are seen about as often as frontal ones.
    """
    if len(landmarks) < 2:
        return np.ones(len(landmarks), np.int64)
    shapes = landmarks - landmarks.mean(axis=1, keepdims=True)
    shapes /= np.sqrt((shapes ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-12
    mean = shapes.mean(axis=0)
    # Orthogonal Procrustes per shape (rotation only; scale is already normalised).
    u, _, vt = np.linalg.svd(np.einsum("nki,kj->nij", shapes, mean))
    aligned = np.einsum("nki,nij->nkj", shapes, u @ vt).reshape(len(shapes), -1)
    centred = aligned - aligned.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projection = np.abs(centred @ components[0])
    edges = np.linspace(projection.min(), projection.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, projection, side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    return np.maximum(1, np.round(counts.max() / counts[which])).astype(np.int64)


class EpochPlan:
    """The (position, dataset index) pairs one shard visits in an epoch, batch by batch.

    Training (shuffle=True): the items, each repeated `repeats[i]` times, in a fresh permutation per epoch; shard s of
    n takes the s-th of n equal contiguous parts (the remainder of len // n is dropped). Evaluation (shuffle=False):
    dataset order, shard parts of sizes differing by at most one, nothing dropped or repeated, so metrics count each
    image once.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool, seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1, drop_last: bool = True, repeats: np.ndarray = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
        self.items = np.arange(num_items) if repeats is None else np.repeat(np.arange(num_items), repeats)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        total = len(self.items)
        if shuffle:
            per = total // num_shards
            self.start, self.stop = shard_id * per, (shard_id + 1) * per
        else:
            bounds = np.linspace(0, total, num_shards + 1).round().astype(int)
            self.start, self.stop = bounds[shard_id], bounds[shard_id + 1]
        size = self.stop - self.start
        self.num_batches = size // batch_size if drop_last else -(-size // batch_size)
        if self.num_batches == 0:
            raise DatasetError(f"shard {shard_id}/{num_shards} gets {size} of {total} samples: not one batch of "
                               f"{batch_size}" + (f" with drop_last: train.batch_size (per process) must be at most "
                                                  f"{size}" if drop_last else ""))

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int, start_batch: int = 0):
        """Yield (positions int64[b], indices int64[b]) per batch of this shard, from batch start_batch on."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        order = self.items
        if self.shuffle:
            order = order[np.random.default_rng([_ORDER_STREAM, self.seed, epoch]).permutation(len(order))]
        for b in range(start_batch, self.num_batches):
            lo = self.start + b * self.batch_size
            positions = np.arange(lo, min(lo + self.batch_size, self.stop))
            yield positions, order[positions]
