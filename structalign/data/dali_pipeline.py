"""The DALI augmentation pipeline: GPU ('mixed' decoder, GPU operators) on a CUDA device, DALI's CPU operators
elsewhere; same contract and same draws as the reference pipeline (structalign/data/reference_pipeline.py).

Python reads the encoded files and plans every sample (structalign/data/augment.py); DALI gets the bytes and the
parameters through external sources and decodes only the region the crop can reach (ROI decoding), warps with the
sample's matrix and moves the landmarks with the same matrix (fn.coord_transform), fills the occlusion rectangle
(fn.erase), blends with the grey image for saturation, and normalises with brightness and contrast folded into the
per-sample mean and std. Batches are fed and
scheduled explicitly, `prefetch` ahead, so an epoch can start at any batch (exact resume). On a GPU the output is
copied on the loader's side stream (structalign/data/transfer.py), which hands it to the training stream with an
event; the host waits for that copy only before the next outputs() call may reuse DALI's buffer, in the loader's
background thread.

An image whose header or bytes cannot be read is found before it is fed; one DALI cannot decode fails its batch: the
loader then decodes that batch's files with PIL to name the bad one, and (on_error="skip") rebuilds the pipeline and
runs the epoch again from that batch with the bad image replaced as batches.py describes.

    .venv/bin/python -m pytest -q tests/data/test_pipelines.py
"""
from collections import deque

import numpy as np
import torch
from PIL import Image

from structalign.data.augment import NORM_MEAN, NORM_STD, colour_gain_offset, invert_affine, to_pixel_corner
from structalign.data.batches import BatchSource, replacements
from structalign.data.records import DatasetError
from structalign.data.reference_pipeline import read_rgb

_MEAN = np.asarray(NORM_MEAN, np.float64)
_STD = np.asarray(NORM_STD, np.float64)

_INPUTS = ("encoded", "roi_start", "roi_shape", "matrix", "points", "erase_anchor", "erase_shape", "erase_colour",
           "saturation", "mean", "std")
_INPUT_TYPES = {"encoded": ("UINT8", 1), "roi_start": ("INT32", 1), "roi_shape": ("INT32", 1), "matrix": ("FLOAT", 2),
                "points": ("FLOAT", 2), "saturation": ("FLOAT", 0)}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _build_pipeline(batch_size: int, size: int, fill: float, device_id, num_threads: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    def augment():
        src = {}
        for name in _INPUTS:
            dtype, ndim = _INPUT_TYPES.get(name, ("FLOAT", 1))
            src[name] = fn.external_source(name=name, dtype=getattr(types, dtype), ndim=ndim)
        images = fn.decoders.image_slice(src["encoded"], src["roi_start"], src["roi_shape"], axis_names="WH",
                                         device="mixed" if gpu else "cpu", output_type=types.RGB,
                                         adjust_orientation=False)
        # warp_perspective rather than warp_affine: same result, about 4x faster on DALI's CPU backend.
        images = fn.experimental.warp_perspective(images, matrix=src["matrix"], size=[size, size],
                                                  fill_value=fill, inverse_map=False, pixel_origin="corner")
        # Landmarks arrive ROI-relative in the pixel-corner convention, so the image's matrix applies unchanged.
        points = fn.coord_transform(src["points"], MT=src["matrix"][0:2, :]) - 0.5
        images = fn.erase(images, anchor=src["erase_anchor"], shape=src["erase_shape"],
                          fill_value=src["erase_colour"], axis_names="HW")
        grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
        saturation = src["saturation"].gpu() if gpu else src["saturation"]
        saturated = images * saturation + grey * (1.0 - saturation)
        # Brightness and contrast are folded into the per-sample normalisation (see _inputs).
        images = fn.crop_mirror_normalize(saturated, mean=src["mean"], std=src["std"], output_layout="CHW",
                                          dtype=types.FLOAT)
        return images, points

    pipe = augment()
    pipe.build()
    return pipe


def _roi(inverse_corner: np.ndarray, size: int, width: int, height: int):
    """(start, shape) int32[2] (x, y) of the source region the S x S crop samples, with a bilinear margin."""
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    src = corners @ inverse_corner[:, :2].T + inverse_corner[:, 2]
    lo = np.maximum(np.floor(src.min(axis=0)) - 2, 0)
    hi = np.minimum(np.ceil(src.max(axis=0)) + 2, [width, height])
    if np.any(hi <= lo):  # the crop misses the image entirely: every pixel is fill, any region will do
        lo, hi = np.zeros(2), np.array([width, height], np.float64)
    return lo.astype(np.int32), (hi - lo).astype(np.int32)


class _DecodeFailure(Exception):
    """DALI could not decode a batch whose bad image is now known: rebuild the pipeline and run again."""


class DaliLoader(BatchSource):
    """make_loader(..., backend="dali"): a DALI pipeline with num_threads CPU threads, `prefetch` batches ahead."""

    def __init__(self, ds, batch_size, train, device, num_threads: int = 2, prefetch: int = 2, **options):
        super().__init__(ds, batch_size, train, device, **options)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda for the DALI pipeline, got {self.device}")
        device_id = self.device.index if self.device.type == "cuda" else None
        fill = self.augment.fill if self.augment is not None else 127.0
        self.prefetch = prefetch
        self._pipeline_args = (batch_size, self.size, fill, device_id, num_threads, prefetch)
        self.pipe = _build_pipeline(*self._pipeline_args)
        self._in_flight = deque()  # (plans, indices) of each batch fed to DALI and not collected yet
        self._copying = None  # (event, DALI output) of the last output copy on the GPU, until it is known complete
        self._primed = False
        self._image_sizes = {}
        self._unreadable = set()  # dataset indices whose image could not be read (on_error="skip")

    def _image_size(self, index: int):
        if index not in self._image_sizes and self.ds[index].image_size is not None:
            self._image_sizes[index] = self.ds[index].image_size  # read from the header when the dataset was opened
        if index not in self._image_sizes:
            path = self.ds[index].image_path
            try:
                with Image.open(path) as im:
                    self._image_sizes[index] = im.size
            except (OSError, ValueError, SyntaxError) as e:
                raise DatasetError(f"cannot read image {path}: {e}") from e
        return self._image_sizes[index]

    def _mark_unreadable(self, index: int, message: str) -> None:
        self.unreadable(index, message)  # raises under on_error="raise"
        self._unreadable.add(index)

    def _readable(self, index: int):
        """(index, encoded bytes) of the sample to make for `index`: itself, or under on_error="skip" the next
        index whose image is not known to be unreadable and whose header and bytes read."""
        for candidate in replacements(index, len(self.ds)):
            if candidate in self._unreadable:
                continue
            path = self.ds[candidate].image_path
            try:
                self._image_size(candidate)
                encoded = np.fromfile(path, dtype=np.uint8)
            except DatasetError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot read image {path}: {e}"
            else:
                return candidate, encoded
            self._mark_unreadable(candidate, error)
        raise DatasetError(f"no readable image left in {self.ds.name}")

    def _inputs(self, plans, indices, encoded):
        feeds = {name: [] for name in _INPUTS}
        feeds["encoded"] = list(encoded)
        for planned, index in zip(plans, indices):
            matrix = to_pixel_corner(planned.matrix)
            start, shape = _roi(invert_affine(matrix), self.size, *self._image_size(int(index)))
            roi_matrix = np.eye(3)
            roi_matrix[:2] = matrix
            roi_matrix[:2, 2] += matrix[:, :2] @ start
            feeds["roi_start"].append(start)
            feeds["roi_shape"].append(shape)
            feeds["matrix"].append(roi_matrix.astype(np.float32))
            feeds["points"].append((planned.landmarks + 0.5 - start).astype(np.float32))
            draw = planned.draw
            x0, y0, x1, y1 = draw.occlusion if draw.occlusion is not None else (0, 0, 0, 0)
            feeds["erase_anchor"].append(np.array([y0, x0], np.float32))
            feeds["erase_shape"].append(np.array([y1 - y0, x1 - x0], np.float32))
            feeds["erase_colour"].append(np.asarray(draw.occlusion_colour, np.float32))
            gain, offset = colour_gain_offset(draw)
            feeds["saturation"].append(np.array(draw.saturation, np.float32))
            feeds["mean"].append(((_MEAN - offset) / gain).astype(np.float32))
            feeds["std"].append((_STD / gain).astype(np.float32))
        return feeds

    def _schedule(self, epoch: int, positions, indices) -> None:
        indices, encoded = zip(*(self._readable(int(i)) for i in indices))
        plans = [self.planned(epoch, int(p), i) for p, i in zip(positions, indices)]
        for name, data in self._inputs(plans, indices, encoded).items():
            self.pipe.feed_input(name, data)
        self._in_flight.append((plans, indices))
        if not self._primed:
            # DALI's first schedule_run runs `prefetch` iterations at once; feed that many before it.
            if len(self._in_flight) < self.prefetch:
                return
            self._primed = True
        self.pipe.schedule_run()

    def _copied(self) -> None:
        """Wait (host) until the last output copy is complete: DALI may then reuse or free its buffer."""
        if self._copying is not None:
            self._copying[0].synchronize()
            self._copying = None

    def _collect(self):
        plans, indices = self._in_flight.popleft()
        self._copied()
        try:
            images, points = self.pipe.outputs()
        except RuntimeError as e:
            found = False
            for index in indices:
                try:
                    read_rgb(self.ds[int(index)].image_path)
                except DatasetError as bad:
                    self._mark_unreadable(int(index), str(bad))
                    found = True
            if not found:
                paths = [self.ds[int(i)].image_path for i in indices]
                raise DatasetError(f"DALI failed on a batch of {paths} that PIL decodes: "
                                   f"{str(e).strip().splitlines()[-1]}") from e
            raise _DecodeFailure() from e
        images = images.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            with self.transfer.side_stream() as stream:
                out = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(images, out, cuda_stream=stream)
            self._copying = (self.transfer.record(), images)
        else:
            out = torch.from_numpy(np.array(images))
        return out, torch.from_numpy(np.array(points.as_tensor())), plans, indices

    def _host_epoch(self, epoch: int, start_batch: int):
        try:
            while True:
                try:
                    for batch in self._run(epoch, start_batch):
                        start_batch += 1
                        yield batch
                    return
                except _DecodeFailure:  # the bad image is marked: a fresh pipeline, and this epoch again from here
                    self._copied()
                    del self.pipe
                    self.pipe = _build_pipeline(*self._pipeline_args)
                    self._in_flight.clear()
                    self._primed = False
        finally:
            self._copied()  # nothing reads DALI's buffers once the epoch is left

    def _run(self, epoch: int, start_batch: int):
        while self._in_flight and self._primed:  # runs left over by an epoch that was not read to the end
            self._collect()
        self._in_flight.clear()
        batches = self.plan.batches(epoch, start_batch)
        wanted = 0
        for positions, indices in batches:
            self._schedule(epoch, positions, indices)
            wanted += 1
            if wanted == self.prefetch:
                break
        while not self._primed and self._in_flight:  # an epoch shorter than the prefetch depth: pad the first run
            plans, indices = self._in_flight[-1]
            self._schedule(epoch, [0] * len(indices), indices)
        collected = 0
        while collected < wanted:
            images, points, plans, indices = self._collect()
            collected += 1
            following = next(batches, None)
            if following is not None:
                self._schedule(epoch, *following)
                wanted += 1
            yield self.finish(images, points, plans, indices)
