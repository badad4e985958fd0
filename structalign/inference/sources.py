"""What a user can hand to a predictor, turned into RGB images: paths, folders (recursive), numpy arrays, PIL
images, torch tensors, or a list of any of these.

Images are decoded with PIL exactly as the data pipeline decodes them (`convert("RGB")`), so a predictor sees the
pixels that `structalign eval` saw. torch is never imported here: a tensor is recognised by its type's module.
"""
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from structalign.errors import InputError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class UnreadableImageError(InputError):
    """An image file that cannot be decoded, or an array / tensor that is not an image."""


@dataclass(frozen=True)
class ImageSource:
    """One input image: name (a path, or e.g. "array[2]") and load() -> uint8[H, W, 3] RGB (decoded on demand, so
    that a folder of thousands of images is never held in memory at once)."""

    name: str
    load: Callable[[], np.ndarray]


def is_video(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def read_image(path: str) -> np.ndarray:
    """The image file at path as uint8[H, W, 3] RGB; UnreadableImageError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"{path}: cannot read image ({exc})") from None


def image_sources(inputs) -> list:
    """ImageSource list for inputs: a path, a folder (its image files, recursively, sorted), an array / PIL image /
    tensor (a 4-D array or tensor is a batch), or a list or tuple of these. A missing path raises MissingFileError."""
    if isinstance(inputs, (list, tuple)):
        return [source for item in inputs for source in image_sources(item)]
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        if os.path.isdir(path):
            return [ImageSource(p, _reader(p)) for p in folder_images(path)]
        if not os.path.exists(path):
            raise MissingFileError(f"{path}: no such file or folder")
        return [ImageSource(path, _reader(path))]
    if isinstance(inputs, Image.Image):
        rgb = np.asarray(inputs.convert("RGB"))
        return [ImageSource("PIL image", lambda: rgb)]
    if type(inputs).__module__.startswith("torch"):
        return [ImageSource(f"tensor[{i}]", _constant(rgb)) for i, rgb in enumerate(_tensor_images(inputs))]
    if isinstance(inputs, np.ndarray):
        return [ImageSource(f"array[{i}]", _constant(rgb)) for i, rgb in enumerate(_array_images(inputs))]
    raise InputError(f"cannot predict on a {type(inputs).__name__}: give image paths, folders, numpy uint8 arrays "
                     "[H, W, 3], PIL images or torch tensors [3, H, W]")


def folder_images(folder: str) -> list:
    """The image files under folder (recursively), sorted by path."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _reader(path: str):
    return lambda: read_image(path)


def _constant(rgb: np.ndarray):
    return lambda: rgb


def _array_images(array: np.ndarray) -> list:
    """uint8 [H, W], [H, W, 3 | 4] or a batch [B, H, W, 3] as RGB images."""
    if array.dtype != np.uint8:
        raise UnreadableImageError(f"numpy images must be uint8 RGB (0..255), got dtype {array.dtype}")
    if array.ndim == 4:
        return [image for a in array for image in _array_images(a)]
    if array.ndim == 2:
        return [np.repeat(array[:, :, None], 3, axis=2)]
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return [np.ascontiguousarray(array[:, :, :3])]
    raise UnreadableImageError(f"numpy images must be [H, W], [H, W, 3] or [B, H, W, 3], got shape "
                               f"{list(array.shape)}")


def _tensor_images(tensor) -> list:
    """torchvision's convention: [3, H, W] or a batch [B, 3, H, W], uint8 0..255 or floating point in [0, 1]."""
    array = tensor.detach().cpu().numpy()
    if array.ndim == 4:
        return [image for a in array for image in _tensor_images_3d(a)]
    return _tensor_images_3d(array)


def _tensor_images_3d(array: np.ndarray) -> list:
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise UnreadableImageError(f"image tensors must be [3, H, W] or [B, 3, H, W], got shape {list(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise UnreadableImageError("floating-point image tensors must hold values in [0, 1]")
        array = np.rint(array * 255)
    elif array.dtype != np.uint8:
        raise UnreadableImageError(f"image tensors must be uint8 or floating point, got {array.dtype}")
    hwc = np.ascontiguousarray(array.transpose(1, 2, 0).astype(np.uint8))
    return [np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc]
