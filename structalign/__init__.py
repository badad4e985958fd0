"""structalign: structure-coherent face alignment (L-GRN) with fused graph and relative-location ops."""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use, so that `import structalign` stays cheap (no torch, models or data pipeline).
    if name == "Predictor":
        from structalign.inference.predictor import Predictor

        return Predictor
    if name == "OnnxPredictor":
        from structalign.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'structalign' has no attribute {name!r}")
