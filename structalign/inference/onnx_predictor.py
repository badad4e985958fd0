"""The ONNX Runtime predictor: an exported graph (structalign export) behind the shared inference steps, with numpy,
PIL, OpenCV and onnxruntime only (no torch import).

    from structalign.inference.onnx_predictor import OnnxPredictor
    predictor = OnnxPredictor("model.onnx")                     # built-in face detector
    faces = predictor.predict("photo.jpg")[0].faces

The graph's metadata (written by structalign/export.py) gives the landmark scheme, the crop size and padding, and
whether the normalisation is in the graph (input "crops") or done here (input "normalised"). Its outputs are
"landmarks" (float32[B, N, 2], crop pixels) and, for a model with a visibility head, "visibility" (float32[B, N],
P(landmark visible), the sigmoid in the graph); faces of a graph without it have visibility None.
"""
import json
import os

import numpy as np

from structalign.errors import InputError, MissingFileError
from structalign.inference.pipeline import LandmarkPipeline, model_scheme
from structalign.inference.runtime import cpu_session_options

INPUT_KINDS = ("normalised", "crops")
LANDMARKS_OUTPUT, VISIBILITY_OUTPUT = "landmarks", "visibility"  # the graph's output names (structalign export)
_PREFIX = "structalign."


def write_metadata(props: dict, scheme: str, image_size: int, padding: float, input_kind: str, num_points: int,
                   mean, std) -> None:
    """Fill an ONNX model's metadata_props (a str -> str dict) with what OnnxPredictor reads. scheme: the landmark
    scheme's content (LandmarkScheme.to_dict()) or a shipped name; mean, std: the data pipeline's normalisation
    (structalign.data.NORM_MEAN / NORM_STD), stored so that this module needs no torch."""
    values = {"scheme": scheme, "image_size": image_size, "crop_padding": padding, "input": input_kind,
              "num_points": num_points, "norm_mean": list(mean), "norm_std": list(std)}
    props.update({_PREFIX + k: json.dumps(v) for k, v in values.items()})


class OnnxPredictor(LandmarkPipeline):
    """An exported structalign graph in ONNX Runtime.

    path: the .onnx file; detector, calibration, flip_test, batch_size: as in structalign.Predictor; threads: ONNX
    Runtime intra-op threads (0 = its default; idle ones sleep, structalign/inference/runtime.py); providers: ONNX
    Runtime execution providers (default CPU).
    """

    def __init__(self, path: str, detector="yunet", flip_test: bool = False, batch_size: int = 32, threads: int = 0,
                 providers=("CPUExecutionProvider",), calibration=None):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise MissingFileError(f"ONNX model {path!r} does not exist")
        try:
            self.session = ort.InferenceSession(path, cpu_session_options(threads), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
            raise InputError(f"ONNX model {path!r} cannot be loaded: {exc}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("image_size", "crop_padding", "input", "num_points") if _PREFIX + k not in meta]
        if missing:
            raise InputError(f"ONNX model {path!r} was not written by `structalign export` (metadata {missing} "
                             "missing)")
        values = {k[len(_PREFIX):]: json.loads(v) for k, v in meta.items() if k.startswith(_PREFIX)}
        self.scheme, self.num_points = model_scheme(values.get("scheme")), int(values["num_points"])
        self.image_size, self.padding = int(values["image_size"]), float(values["crop_padding"])
        self.input_kind = values["input"]
        if self.input_kind not in INPUT_KINDS:
            raise InputError(f"ONNX model {path!r}: unknown input kind {self.input_kind!r}")
        self._mean = np.asarray(values["norm_mean"], np.float32)[:, None, None]  # per channel of a CHW image
        self._std = np.asarray(values["norm_std"], np.float32)[:, None, None]
        self._input = self.session.get_inputs()[0].name
        self.has_visibility = VISIBILITY_OUTPUT in [output.name for output in self.session.get_outputs()]
        self._outputs = [LANDMARKS_OUTPUT] + ([VISIBILITY_OUTPUT] if self.has_visibility else [])
        self._setup(detector, flip_test, batch_size, calibration)

    def _forward(self, crops: np.ndarray) -> tuple:
        """crops (uint8[B, S, S, 3]) -> (landmarks float32[B, N, 2] crop pixels, P(visible) float32[B, N] or None)."""
        if self.input_kind == "normalised":  # (crop - mean) / std, in one copy to float32 CHW and two passes in place
            feed = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
            feed -= self._mean
            feed /= self._std
        else:
            feed = np.ascontiguousarray(crops)
        points, *visibility = self.session.run(self._outputs, {self._input: feed})
        return points, visibility[0] if visibility else None
