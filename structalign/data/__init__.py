"""Datasets, augmentation pipelines and built-in data: everything from files on disk to a batch on the device.

    open_dataset(root, fmt, split, on_error, face_box)  WFLW / 300W / COFW / COCO / imglab XML -> FaceDataset
                                           (every record checked; ds.write_skipped(path) lists what was skipped)
    split_validation(ds, fraction, seed)   deterministic validation carve-out of a training set
    make_loader(ds, batch_size, train, device, backend="dali" | "reference", ...) -> loader.epoch(e, start_batch)
    structalign.data.synth.render_dataset  built-in face-like data in the WFLW layout
"""
from structalign.data.augment import CROP_PADDING, NORM_MEAN, NORM_STD, AugmentConfig, invert_affine
from structalign.data.batches import Batch
from structalign.data.datasets import open_dataset, split_validation
from structalign.data.loader import make_loader, mean_crop_landmarks
from structalign.data.records import (OCCLUDED, UNLABELLED, VISIBLE, DatasetError, FaceDataset, FaceRecord, Problem,
                                      Skipped, write_skipped)

__all__ = [
    "CROP_PADDING",
    "NORM_MEAN",
    "NORM_STD",
    "OCCLUDED",
    "UNLABELLED",
    "VISIBLE",
    "AugmentConfig",
    "Batch",
    "DatasetError",
    "FaceDataset",
    "FaceRecord",
    "Problem",
    "Skipped",
    "invert_affine",
    "make_loader",
    "mean_crop_landmarks",
    "open_dataset",
    "split_validation",
    "write_skipped",
]
