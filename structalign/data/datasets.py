"""Opening a dataset folder in any supported format, and carving a validation set out of a training set."""
import numpy as np

from structalign.data.cofw import read_cofw
from structalign.data.coco import read_coco
from structalign.data.ibug300w import read_300w
from structalign.data.imglab import read_imglab
from structalign.data.records import FaceDataset
from structalign.data.wflw import read_wflw

READERS = {"wflw": read_wflw, "300w": read_300w, "cofw": read_cofw, "coco": read_coco, "xml": read_imglab}


def open_dataset(root: str, fmt: str = "wflw", split: str = "train", on_error: str = "raise", **options) -> FaceDataset:
    """Read split `split` of the dataset at `root` stored in format fmt ("wflw", "300w", "cofw", "coco", "xml").

    on_error="raise" stops at the first malformed annotation or missing image with a DatasetError naming file and
    line; "skip" leaves such entries out and lists them in ds.skipped. options go to the reader (cofw: cache_dir).
    """
    if fmt not in READERS:
        raise ValueError(f"fmt must be one of {sorted(READERS)}, got {fmt!r}")
    return READERS[fmt](root, split=split, on_error=on_error, **options)


def split_validation(ds: FaceDataset, fraction: float = 0.05, seed: int = 0):
    """Deterministically split a training set into (train_ds, val_ds); val_ds holds round(fraction * len) faces.

    Use it for model selection instead of the test set.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = int(round(fraction * len(ds)))
    if n_val == 0 or n_val == len(ds):
        raise ValueError(f"fraction {fraction} of {len(ds)} faces leaves an empty train or validation set")
    order = np.random.default_rng([seed, 0x7A11]).permutation(len(ds))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return ds.subset(train, f"{ds.name}-train{seed}"), ds.subset(val, f"{ds.name}-val{seed}")
