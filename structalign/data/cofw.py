"""COFW reader: the 29-point colour release COFW_train_color.mat / COFW_test_color.mat.

Train holds IsTr (images), phisTr (rows: 29 x, 29 y, 29 occlusion flags, 1-based) and bboxesTr (x y w h, 1-based);
test holds IsT / phisT / bboxesT. A point whose occlusion flag is > 0 is OCCLUDED, every other one VISIBLE.
MATLAB v7.3 files (HDF5) are read with h5py, older v5 files with scipy.io.loadmat.
The images live inside the .mat, so the first open performs a one-time conversion: each image is written losslessly
to ROOT/COFW_images/<split>/<entry>.png (or under cache_dir), and later opens reuse those files.
"""
import os

import numpy as np

from structalign.data.records import (OCCLUDED, VISIBLE, DatasetError, FaceDataset, Problems, make_record,
                                      require_file)
from structalign.landmarks import COFW29

FILES = {"train": ("COFW_train_color.mat", "IsTr", "phisTr", "bboxesTr"),
         "test": ("COFW_test_color.mat", "IsT", "phisT", "bboxesT")}
SPLITS = tuple(FILES)


def _load_hdf5(path: str, keys):
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise DatasetError(f"{path}: variables {missing} missing (holds {sorted(f.keys())})")
        images_key, phis_key, boxes_key = keys
        refs = np.asarray(f[images_key]).ravel()
        # MATLAB stores arrays column-major: an H x W x 3 image reads back as 3 x W x H.
        images = [np.asarray(f[r]).T for r in refs]
        phis, boxes = np.asarray(f[phis_key]).T, np.asarray(f[boxes_key]).T
    return images, phis, boxes


def _load_v5(path: str, keys):
    from scipy.io import loadmat

    data = loadmat(path)
    missing = [k for k in keys if k not in data]
    if missing:
        raise DatasetError(f"{path}: variables {missing} missing")
    images_key, phis_key, boxes_key = keys
    images = [np.asarray(im) for im in data[images_key].ravel()]
    return images, np.asarray(data[phis_key]), np.asarray(data[boxes_key])


def load_mat(path: str, keys):
    """(images list of uint8[H, W(, 3)], phis float[n, 87], boxes float[n, 4]) from a v7.3 or v5 .mat file."""
    import h5py

    try:
        images, phis, boxes = _load_hdf5(path, keys) if h5py.is_hdf5(path) else _load_v5(path, keys)
    except DatasetError:
        raise
    except Exception as e:  # scipy/h5py raise many types for a corrupt file; name the file either way
        raise DatasetError(f"{path}: cannot read as a MATLAB file ({type(e).__name__}: {e})") from e
    if phis.ndim != 2 or phis.shape[1] != 3 * COFW29.num_points:
        raise DatasetError(f"{path}: {keys[1]} must be n x 87 (29 x, 29 y, 29 occlusion flags), got {phis.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DatasetError(f"{path}: {keys[2]} must be n x 4 (x y w h), got {boxes.shape}")
    if not len(images) == len(phis) == len(boxes):
        raise DatasetError(f"{path}: {len(images)} images, {len(phis)} shapes and {len(boxes)} boxes differ in count")
    return images, phis, boxes


def _write_image(image: np.ndarray, path: str) -> None:
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def read_cofw(root: str, split: str = "train", on_error: str = "raise",
              face_box: str = "annotation", cache_dir: str = None) -> FaceDataset:
    """Open COFW split "train" or "test", extracting its images on first use (see the module docstring)."""
    if split not in FILES:
        raise DatasetError(f"COFW split must be one of {SPLITS}, got {split!r}")
    name, *keys = FILES[split]
    path = require_file(os.path.join(root, name), f"COFW {split} file")
    images, phis, boxes = load_mat(path, keys)
    out_dir = os.path.join(cache_dir or os.path.join(root, "COFW_images"), split)
    os.makedirs(out_dir, exist_ok=True)
    problems = Problems(on_error, face_box)
    records = []
    n = COFW29.num_points
    for i, (image, phi, box) in enumerate(zip(images, phis, boxes)):
        image_path = os.path.join(out_dir, f"{i + 1:05d}.png")
        if image.ndim not in (2, 3) or image.size == 0:
            problems.report(path, i + 1, f"{keys[0]} entry is not an image (shape {image.shape})")
            continue
        if not os.path.isfile(image_path):
            _write_image(image, image_path)
        landmarks = np.stack([phi[:n], phi[n:2 * n]], axis=1) - 1.0
        x, y, w, h = box
        record = make_record(problems, path, i + 1, image_path, landmarks, [x - 1, y - 1, x - 1 + w, y - 1 + h],
                             visibility=np.where(phi[2 * n:] > 0, OCCLUDED, VISIBLE),
                             image_size=(image.shape[1], image.shape[0]))
        if record is not None:
            records.append(record)
    return FaceDataset(records, COFW29, f"cofw:{split}", problems.skipped)
