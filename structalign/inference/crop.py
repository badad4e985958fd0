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
    return crop_images(rgb, np.asarray(matrix)[None], size)[0]


def _source_window(origin: float, step: float, size: int, extent: int) -> tuple:
    """The pixels [lo, hi) of an image side of `extent` pixels that PIL's bilinear transform reads for `size` output
    pixels sampled at origin + step (u + 0.5), u < size, with a margin of 2 (the samples' neighbours, and PIL's
    clipping to the edge happens only where the window reaches the image's edge)."""
    first, last = origin + 0.5 * step, origin + (size - 0.5) * step
    return max(0, int(np.floor(min(first, last))) - 2), min(extent, int(np.ceil(max(first, last))) + 3)


def crop_images(rgb: np.ndarray, matrices: np.ndarray, size: int) -> np.ndarray:
    """The crops (uint8[K, S, S, 3]) of rgb (uint8[H, W, 3]) under matrices (float[K, 2, 3], image -> crop pixels),
    each as crop_image takes it. Only the window of the picture a crop reads becomes a PIL image (a shift of the
    transform's origin by the window's corner gives the same pixels)."""
    crops = np.empty((len(matrices), size, size, 3), np.uint8)
    height, width = rgb.shape[:2]
    for crop, matrix in zip(crops, matrices):
        # PIL maps each output pixel corner (u, v) to the input corner (a u + c, e v + f): the inverse affine, moved
        # from the pixel-centre to the pixel-corner convention, computed as the evaluation crop computes it
        # (structalign.data.augment invert_affine, to_pixel_corner) so that both round alike.
        linear = np.linalg.inv(np.asarray(matrix, np.float64)[:, :2])
        shift = -(linear @ np.asarray(matrix, np.float64)[:, 2]) + 0.5 - 0.5 * linear.sum(axis=1)
        (a, b), (d, e) = linear
        c, f = shift
        (x0, x1), (y0, y1) = _source_window(c, a, size, width), _source_window(f, e, size, height)
        if b or d:  # a rotation reads across the window's sides: the whole picture
            x0, x1, y0, y1 = 0, width, 0, height
        if x0 >= x1 or y0 >= y1:  # the crop lies wholly outside the picture
            crop[:] = FILL
            continue
        window = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
        crop[:] = window.transform((size, size), Image.AFFINE, data=(a, b, c - x0, d, e, f - y0),
                                   resample=Image.BILINEAR, fillcolor=(FILL, FILL, FILL))
    return crops


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
