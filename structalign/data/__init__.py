"""Datasets, augmentation pipelines and built-in data: everything from files on disk to a batch on the device.

    open_dataset(root, fmt, split)         WFLW / 300W / COFW / COCO-keypoints / imglab XML -> FaceDataset
    split_validation(ds, fraction, seed)   deterministic validation carve-out of a training set
    make_loader(ds, batch_size, train, device, backend="dali" | "reference", ...) -> loader.epoch(e, start_batch)
    structalign.data.synth.render_dataset  built-in face-like data in the WFLW layout
"""
from structalign.data.augment import NORM_MEAN, NORM_STD, AugmentConfig, invert_affine
from structalign.data.batches import Batch
from structalign.data.datasets import open_dataset, split_validation
from structalign.data.loader import make_loader
from structalign.data.records import DatasetError, FaceDataset, FaceRecord, Skipped

__all__ = [
    "NORM_MEAN",
    "NORM_STD",
    "AugmentConfig",
    "Batch",
    "DatasetError",
    "FaceDataset",
    "FaceRecord",
    "Skipped",
    "invert_affine",
    "make_loader",
    "open_dataset",
    "split_validation",
]
