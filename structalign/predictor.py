"""Batch inference from a trained checkpoint.

    from structalign import Predictor
    predictor = Predictor("runs/demo/best.pt")
    points = predictor.predict(["face.jpg"], boxes=[[40, 30, 200, 210]])   # ndarray[1, N, 2], image pixels

Images go through the same test-time crop and normalisation as evaluation (structalign.data.make_loader), so a
checkpoint predicts here exactly what `structalign eval` measured.
"""
import numpy as np
import torch
from PIL import Image

from structalign.data import make_loader
from structalign.data.records import FaceDataset, FaceRecord
from structalign.engine.distributed import DistEnv
from structalign.engine.evaluate import predict_split
from structalign.engine.train import autocast_for
from structalign.engine.checkpoint import model_from_checkpoint


class Predictor:
    """A checkpoint's model ready for inference.

    checkpoint: path of a structalign checkpoint; device "auto" (CUDA where present), "cpu" or "cuda"; weights
    "ema" (where the run kept an EMA) or "model"; batch_size: images per forward; num_threads: image-decoding worker
    processes (0 = in this process).
    """

    def __init__(self, checkpoint: str, device: str = "auto", weights: str = "ema", batch_size: int = 32,
                 num_threads: int = 0):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size, self.num_threads = batch_size, num_threads
        self.model, state = model_from_checkpoint(checkpoint, weights=weights, device=self.device)
        self.scheme = self.model.scheme
        self.image_size = state["model_args"]["image_size"]
        self._autocast = autocast_for(state["config"]["train"]["precision"], self.device)

    def predict(self, images, boxes=None) -> np.ndarray:
        """Landmarks (ndarray[B, N, 2], original-image pixels, pixel centres at integers) for image paths (list of str).

        boxes: None (each whole image is its face box) or a sequence of B boxes (x0, y0, x1, y1) in image pixels.
        """
        if isinstance(images, str):
            raise TypeError("images must be a list of image paths, got a single str (wrap it in a list)")
        images = list(images)
        if not images:
            return np.zeros((0, self.scheme.num_points, 2), np.float32)
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"boxes: {len(boxes)} boxes for {len(images)} images")
        records = []
        for i, path in enumerate(images):
            box = self._box(path, None if boxes is None else boxes[i], i)
            n = self.scheme.num_points
            records.append(FaceRecord(str(path), np.zeros((n, 2), np.float32), box, None, np.ones(n, np.float32)))
        dataset = FaceDataset(records, self.scheme, "predict")
        loader = make_loader(dataset, self.batch_size, train=False, device=self.device, image_size=self.image_size,
                             backend="reference", num_threads=self.num_threads, drop_last=False)
        single = DistEnv(rank=0, world_size=1, local_rank=0, device=self.device, owns_group=False)
        arrays = predict_split(self.model, loader, len(dataset), single, self._autocast)
        return arrays["predictions"].astype(np.float32)

    @staticmethod
    def _box(path: str, box, i: int) -> np.ndarray:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError) as exc:
            raise ValueError(f"images[{i}]: cannot read {path!r}: {exc}") from None
        if box is None:  # pixel centres at integers: the image spans [-0.5, size - 0.5]
            return np.array([-0.5, -0.5, width - 0.5, height - 0.5], np.float32)
        box = np.asarray(box, dtype=np.float32)
        if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"boxes[{i}]: expected x0, y0, x1, y1 with x1 > x0 and y1 > y0, got {box.tolist()}")
        return box
