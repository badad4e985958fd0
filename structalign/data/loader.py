"""make_loader: the one entry point from a FaceDataset to batches on the training device."""
from typing import Optional

import numpy as np

from structalign.data.augment import CROP_PADDING, AugmentConfig
from structalign.data.records import FaceDataset
from structalign.data.reference_pipeline import ReferenceLoader
from structalign.errors import InputError

BACKENDS = ("dali", "reference")


def make_loader(ds: FaceDataset, batch_size: int, train: bool, device, image_size: int = 256, backend: str = "dali",
                shard_id: int = 0, num_shards: int = 1, seed: int = 0, num_threads: int = 2, balance=None,
                augment: Optional[AugmentConfig] = None, drop_last=None, padding: float = CROP_PADDING,
                on_error: str = "raise", skip_log: Optional[str] = None):
    """A loader of S x S (S = image_size) crops of ds: len(loader) batches per epoch on this shard, and
    loader.epoch(e, start_batch=0) yielding structalign.data.Batch (see batches.py), each made in a background thread
    while the one before is used, and on CUDA handed over without blocking the device (transfer.py).

    train=True: shuffled per epoch, augmented with `augment` (None = crop only), optional pose-based balancing
    (balance="pdb"), drop_last by default. train=False: dataset order, crop and normalise only; Batch.matrix maps
    crop predictions back (structalign.data.invert_affine). backend "dali" (DALI on the device's kind: GPU decoder
    and operators on CUDA, CPU operators otherwise) or "reference" (numpy + PIL in a torch DataLoader with
    num_threads workers). Sharding: shard_id of num_shards, each a disjoint part of the epoch. padding: crop side /
    face box side. on_error: an image that cannot be read stops the epoch with a DatasetError ("raise") or its sample
    is replaced by the next readable one ("skip", reported on stderr and appended to the file skip_log).
    """
    options = dict(image_size=image_size, shard_id=shard_id, num_shards=num_shards, seed=seed, balance=balance,
                   augment=augment, drop_last=drop_last, padding=padding, on_error=on_error, skip_log=skip_log)
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    if backend == "dali":
        # Imported on use: DALI is optional and takes seconds to import.
        from structalign.data.dali_pipeline import DaliLoader, dali_available

        if not dali_available():
            raise InputError("backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                               "backend='reference' runs without it")
        return DaliLoader(ds, batch_size, train, device, num_threads=max(1, num_threads), **options)
    if backend == "reference":
        return ReferenceLoader(ds, batch_size, train, device, num_threads=num_threads, **options)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def mean_crop_landmarks(loader, max_images: int = 512) -> np.ndarray:
    """Mean landmarks (ndarray[N, 2], crop pixels) over the first max_images of an un-augmented loader."""
    total, count = 0.0, 0
    for batch in loader.epoch(0):
        total = total + batch.landmarks.double().sum(dim=0)
        count += batch.landmarks.shape[0]
        if count >= max_images:
            break
    return (total / count).float().cpu().numpy()
