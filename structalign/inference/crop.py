"""The test-time crop of a face and the way back, in numpy + PIL (no torch), for both predictors.

The crop is the one evaluation takes (structalign/data/augment.py `sample_matrix` with no augmentation, warped as
structalign/data/reference_pipeline.py `augment_image` warps): a square of side padding x max(box width, height)
around the box centre, resized to S x S with PIL's bilinear affine, grey 127 outside the image. Pixel centres at
integers in both images. It is restated here because structalign.data imports torch on import; the test
tests/inference/test_predictor.py::test_crop_is_the_evaluation_crop holds the two equal.
"""
import numpy as np
from PIL import Image

FILL = 127


def crop_matrix(box, size: int, padding: float) -> np.ndarray:
    """The affine (float64[2, 3]) from image pixels to the S x S (S = size) crop pixels around box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    zoom = size / (padding * max(x1 - x0, y1 - y0))
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    return np.array([[zoom, 0.0, (size - 1) / 2 - zoom * centre[0]], [0.0, zoom, (size - 1) / 2 - zoom * centre[1]]])


def crop_image(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The crop (uint8[S, S, 3]) of rgb (uint8[H, W, 3]) under matrix (image -> crop pixels)."""
    zoom, tx, ty = matrix[0, 0], matrix[0, 2], matrix[1, 2]
    # PIL maps each output pixel corner (u, v) to the input corner (a u + c, e v + f): the inverse affine, moved from
    # the pixel-centre to the pixel-corner convention (the shift by 0.5 on both sides).
    a, c = 1 / zoom, -tx / zoom + 0.5 - 0.5 / zoom
    e, f = 1 / zoom, -ty / zoom + 0.5 - 0.5 / zoom
    image = Image.fromarray(rgb)
    crop = image.transform((size, size), Image.AFFINE, data=(a, 0.0, c, 0.0, e, f), resample=Image.BILINEAR,
                           fillcolor=(FILL, FILL, FILL))
    return np.asarray(crop)


def to_image_pixels(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Crop-pixel points (float[B, N, 2]) back to image pixels through the crop affines (float[B, 2, 3])."""
    zoom, shift = matrices[:, None, [0, 1], [0, 1]], matrices[:, None, :, 2]
    return (np.asarray(points, np.float64) - shift) / zoom


def mirror_points(points: np.ndarray, flip: np.ndarray, size: int) -> np.ndarray:
    """Points (float[B, N, 2]) predicted on horizontally mirrored S x S crops, back in the unmirrored crop and in
    the scheme's order: new point i is mirrored point flip[i], x -> S - 1 - x."""
    out = np.array(points, np.float64)[:, flip]
    out[..., 0] = size - 1 - out[..., 0]
    return out
