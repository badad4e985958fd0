"""Inference as a product: from photos, folders, arrays, tensors or videos to landmarks, with a face detector.

    Predictor(CKPT)              the PyTorch model of a checkpoint       (structalign/inference/predictor.py)
    OnnxPredictor(model.onnx)    the exported graph in ONNX Runtime, no torch import (onnx_predictor.py)
    YuNetFaceDetector()          the YuNet CNN face detector in ONNX Runtime, calibrated to dataset boxes (detector.py)
    predict_video(...)           detection every k frames, faces followed and One-Euro filtered, overlay video +
                                 per-frame JSON/CSV (video.py)

Everything here except predictor.py imports numpy, PIL, OpenCV and ONNX (Runtime) only, so the ONNX path runs without
torch.
"""


def __getattr__(name):
    # Imported on first use: Predictor needs torch, the rest of the package must not pull it in.
    if name == "Predictor":
        from structalign.inference.predictor import Predictor

        return Predictor
    if name == "OnnxPredictor":
        from structalign.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'structalign.inference' has no attribute {name!r}")
