"""Opening a dataset folder in any supported format, and carving a validation set out of a training set."""
import numpy as np

from structalign.data.cofw import read_cofw
from structalign.data.coco import read_coco
from structalign.data.ibug300w import read_300w
from structalign.data.imglab import read_imglab
from structalign.data.listfile import read_list
from structalign.data.records import ANY_COUNT, DatasetError, FaceDataset
from structalign.data.wflw import read_wflw
from structalign.landmarks import needs_mean_shape, provisional_scheme, resolve_scheme

READERS = {"wflw": read_wflw, "300w": read_300w, "cofw": read_cofw, "coco": read_coco, "xml": read_imglab,
           "list": read_list}
ANY_COUNT_FORMATS = ("coco", "xml", "list")  # formats that carry any number of landmarks


def open_dataset(root: str, fmt: str = "wflw", split: str = "train", on_error: str = "raise",
                 face_box: str = "annotation", scheme=None, **options) -> FaceDataset:
    """Read split `split` of the dataset at `root` stored in format fmt ("wflw", "300w", "cofw", "coco", "xml",
    "list").

    scheme: None (the format's own; for coco / xml / list the shipped scheme with the data's point count), or a
    LandmarkScheme, shipped name, scheme file or its content (structalign/landmarks.py) with the data's point count;
    a scheme file whose graph is derived (knn) is resolved on this split's mean shape (FaceDataset.mean_shape).
    ANY_COUNT reads coco / xml / list data of any point count under a placeholder scheme (to propose one).

    Every record is checked as it is read (structalign/data/records.py: landmarks, box, image header, duplicates).
    on_error="raise" stops at the first problem with a DatasetError naming file and line; "skip" leaves such entries
    out and lists them in ds.skipped. face_box: "annotation" (the format's face box; 300W's is the landmark box) or
    "landmarks" (the tight box of the landmarks, for every format). options go to the reader (cofw: cache_dir).
    """
    if fmt not in READERS:
        raise DatasetError(f"fmt must be one of {sorted(READERS)}, got {fmt!r}")
    if scheme is None:
        return READERS[fmt](root, split=split, on_error=on_error, face_box=face_box, **options)
    derived = scheme != ANY_COUNT and needs_mean_shape(scheme)
    given = scheme if scheme == ANY_COUNT else provisional_scheme(scheme) if derived else resolve_scheme(scheme)
    if fmt in ANY_COUNT_FORMATS:
        ds = READERS[fmt](root, split=split, on_error=on_error, face_box=face_box, scheme=given, **options)
    elif given == ANY_COUNT:
        ds = READERS[fmt](root, split=split, on_error=on_error, face_box=face_box, **options)
    else:
        ds = READERS[fmt](root, split=split, on_error=on_error, face_box=face_box, **options).with_scheme(given)
    return ds.with_scheme(resolve_scheme(scheme, mean_shape=ds.mean_shape())) if derived else ds


def split_validation(ds: FaceDataset, fraction: float = 0.05, seed: int = 0):
    """Deterministically split a training set into (train_ds, val_ds); val_ds holds round(fraction * len) faces.

    Use it for model selection instead of the test set.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = int(round(fraction * len(ds)))
    if n_val == 0 or n_val == len(ds):
        raise DatasetError(f"fraction {fraction} of {len(ds)} faces leaves an empty train or validation set")
    order = np.random.default_rng([seed, 0x7A11]).permutation(len(ds))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return ds.subset(train, f"{ds.name}-train{seed}"), ds.subset(val, f"{ds.name}-val{seed}")
