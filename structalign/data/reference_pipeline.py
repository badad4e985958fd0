"""The reference pipeline: numpy + PIL, run by a torch DataLoader; the oracle of the DALI pipeline and its fallback.

Same contract and same draws as structalign/data/dali_pipeline.py (see structalign/data/augment.py): decode with PIL,
warp with PIL's bilinear affine (fill grey outside the image), fill the occlusion rectangle, apply saturation,
contrast and brightness, normalise. Tested by tests/data/test_pipelines.py; benchmarked by benchmarks/data.py.
"""
import numpy as np
import torch
from PIL import Image

from structalign.data.augment import (LUMA, NORM_MEAN, NORM_STD, PlannedSample, colour_gain_offset, invert_affine,
                                      to_pixel_corner, transform_points)
from structalign.data.batches import BatchSource, SamplePlanner, replacements
from structalign.data.records import DatasetError

_MEAN = np.asarray(NORM_MEAN, np.float32)
_STD = np.asarray(NORM_STD, np.float32)
_LUMA = LUMA.astype(np.float32)


def read_rgb(path: str) -> Image.Image:
    """The image at path as a decoded RGB PIL image; DatasetError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def augment_image(image: Image.Image, planned: PlannedSample, size: int, fill: float = 127.0) -> np.ndarray:
    """The normalised crop (float32[3, S, S]) of image under planned's matrix, occlusion and colour transform."""
    inverse = to_pixel_corner(invert_affine(planned.matrix))
    grey = int(round(fill))
    crop = image.transform((size, size), Image.AFFINE, data=tuple(inverse.ravel()), resample=Image.BILINEAR,
                           fillcolor=(grey, grey, grey))
    pixels = np.asarray(crop, dtype=np.float32).copy()
    draw = planned.draw
    if draw.occlusion is not None:
        x0, y0, x1, y1 = draw.occlusion
        pixels[y0:y1, x0:x1] = draw.occlusion_colour
    grey = np.rint(pixels @ _LUMA)[..., None]
    gain, offset = colour_gain_offset(draw)
    pixels = gain * (pixels * draw.saturation + grey * (1.0 - draw.saturation)) + offset
    return np.ascontiguousarray(((pixels - _MEAN) / _STD).transpose(2, 0, 1), dtype=np.float32)  # CHW in memory


def augment_landmarks(planned: PlannedSample) -> np.ndarray:
    """planned's landmarks (float32[N, 2]) in crop pixels."""
    return transform_points(planned.landmarks.astype(np.float64), planned.matrix).astype(np.float32)


class _Samples(torch.utils.data.Dataset):
    """Keyed by (epoch, position, index): (crop, landmarks, key of the sample made, [(index, message)] of the
    unreadable images met). An unreadable image ends the item under on_error="raise" (crop None), else the next
    index is tried (batches.py); the main process reports them, so a worker never raises for a bad file."""

    def __init__(self, planner: SamplePlanner, fill: float, on_error: str):
        self.planner, self.fill, self.on_error = planner, fill, on_error

    def __len__(self) -> int:
        return len(self.planner.ds)

    def __getitem__(self, key):
        epoch, position, index = key
        ds, failures = self.planner.ds, []
        for candidate in replacements(index, len(ds)):
            try:
                image = read_rgb(ds[candidate].image_path)
            except DatasetError as e:
                failures.append((candidate, str(e)))
                if self.on_error == "raise":
                    break
                continue
            planned = self.planner(epoch, position, candidate)
            crop = augment_image(image, planned, self.planner.size, self.fill)
            return crop, augment_landmarks(planned), (epoch, position, candidate), failures
        return None, None, key, failures


def _collate(items):
    crops, landmarks, keys, failures = zip(*items)
    failures = [f for item in failures for f in item]
    if any(crop is None for crop in crops):
        return None, None, keys, failures
    return torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(landmarks)), keys, failures


class _EpochSampler:
    """The batch sampler of the DataLoader: batches of sample keys of the epoch set by `select`."""

    def __init__(self, source: BatchSource):
        self.source, self.epoch, self.start_batch = source, 0, 0

    def select(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.source) - self.start_batch

    def __iter__(self):
        for positions, indices in self.source.plan.batches(self.epoch, self.start_batch):
            yield [(self.epoch, int(p), int(i)) for p, i in zip(positions, indices)]


class ReferenceLoader(BatchSource):
    """make_loader(..., backend="reference"): num_threads DataLoader worker processes (0 = in this process)."""

    def __init__(self, ds, batch_size, train, device, num_threads: int = 2, **options):
        super().__init__(ds, batch_size, train, device, **options)
        fill = self.augment.fill if self.augment is not None else 127.0
        self.sampler = _EpochSampler(self)
        self.loader = torch.utils.data.DataLoader(
            _Samples(self.planned, fill, self.on_error), batch_sampler=self.sampler, num_workers=num_threads,
            collate_fn=_collate,
            # Not persistent: persistent workers measured a 5 s hang per worker when the loader was deleted. Not
            # pinned here: the batch is pinned on its way to the device (transfer.py).
            persistent_workers=False)

    def _host_epoch(self, epoch: int, start_batch: int):
        self.sampler.select(epoch, start_batch)
        # Started in the caller's thread: the workers fork from it, and the DataLoader's seed is drawn from torch's
        # global generator at a fixed point of the caller's work (from the background thread it could land anywhere).
        return self._batches(iter(self.loader))

    def _batches(self, samples):
        for images, landmarks, keys, failures in samples:
            for index, message in failures:
                self.unreadable(index, message)
            if images is None:
                raise DatasetError(f"no readable image left in {self.ds.name}")
            plans = [self.planned(*key) for key in keys]
            yield self.finish(images, landmarks, plans, [key[2] for key in keys])
