"""The PyTorch predictor: a checkpoint's model behind the shared inference steps (structalign/inference/pipeline.py).

    from structalign import Predictor
    predictor = Predictor("runs/demo/best.pt")                  # built-in face detector
    for image in predictor.predict(["photo.jpg", "folder/"]):
        for face in image.faces:
            face.box, face.score, face.landmarks              # landmarks float32[N, 2], image pixels
            face.visibility                                   # P(visible) float32[N], None: no visibility head

Crops and normalisation are the ones evaluation uses, so with the dataset's boxes a checkpoint predicts here exactly
what `structalign eval` measured (tests/engine/test_cli.py::test_predictor_matches_evaluation).
"""
import numpy as np
import torch

from structalign.data import NORM_MEAN, NORM_STD
from structalign.engine.checkpoint import model_from_checkpoint
from structalign.engine.precision import autocast_for
from structalign.errors import InputError
from structalign.inference.pipeline import LandmarkPipeline

# Checkpoints written before data.crop_padding existed were trained with this crop padding.
LEGACY_CROP_PADDING = 1.25


def checkpoint_inference_settings(state: dict) -> dict:
    """The crop a checkpoint's model was trained on: image_size and crop padding (read defensively: older
    checkpoints lack data.crop_padding)."""
    data = (state.get("config") or {}).get("data") or {}
    return {"image_size": int(state["model_args"].get("image_size") or data["image_size"]),
            "padding": float(data.get("crop_padding", LEGACY_CROP_PADDING))}


class Predictor(LandmarkPipeline):
    """A checkpoint's model ready for inference.

    checkpoint: path of a structalign checkpoint; device "auto" (CUDA where present), "cpu" or "cuda"; weights "ema"
    (where the run kept an EMA) or "model"; detector: "yunet" (built-in), None (whole image = face box) or a callable
    rgb -> (boxes, scores) (see structalign/inference/detector.py); calibration: detector box -> face box (default:
    the detector's own); flip_test: average with the prediction on the mirrored crop; batch_size: faces per forward.
    Faces carry visibility = sigmoid(the model's visibility logits), P(landmark visible) per point; None for a model
    without a visibility head (checkpoints from before it existed load that way).
    """

    def __init__(self, checkpoint: str, device: str = "auto", weights: str = "ema", detector="yunet",
                 flip_test: bool = False, batch_size: int = 32, calibration=None):
        if device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("device='cuda' but no CUDA device is available")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model, state = model_from_checkpoint(checkpoint, weights=weights, device=self.device)
        settings = checkpoint_inference_settings(state)
        self.scheme, self.num_points = self.model.scheme, self.model.scheme.num_points
        self.has_visibility = self.model.visibility is not None
        self.image_size, self.padding = settings["image_size"], settings["padding"]
        precision = ((state.get("config") or {}).get("train") or {}).get("precision", "fp32")
        self._autocast = autocast_for(precision, self.device)
        self._mean = torch.tensor(NORM_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(NORM_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._setup(detector, flip_test, batch_size, calibration)

    @torch.no_grad()
    def _forward(self, crops: np.ndarray) -> tuple:
        """crops (uint8[B, S, S, 3]) -> (landmarks float32[B, N, 2] crop pixels, P(visible) float32[B, N] or None)."""
        images = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
        with self._autocast():
            points, logits = self.model((images - self._mean) / self._std)
        visibility = None if logits is None else torch.sigmoid(logits.float()).cpu().numpy()
        return points.float().cpu().numpy(), visibility
