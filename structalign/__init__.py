"""structalign: structure-coherent face alignment (L-GRN) with fused graph and relative-location ops."""
import importlib.util
import re

__version__ = "0.1.0"
TORCH_MINIMUM = (2, 11)
TORCH_REQUIREMENT = (f"structalign needs PyTorch >= {TORCH_MINIMUM[0]}.{TORCH_MINIMUM[1]}: pip install torch "
                     "(see README 'Install')")


def torch_requirement_error() -> str | None:
    """One line saying what to install when torch is missing or older than TORCH_MINIMUM, else None.

    Reads what is installed without importing torch: the ONNX predictor, the metrics and the landmark schemes run
    without it."""
    if importlib.util.find_spec("torch") is None:
        return TORCH_REQUIREMENT
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:  # a torch without package metadata (a source tree on the path)
        return None
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < TORCH_MINIMUM:
        return f"{TORCH_REQUIREMENT}; found torch {version}"
    return None


def __getattr__(name):
    # Imported on first use, so that `import structalign` stays cheap (no torch, models or data pipeline).
    if name == "Predictor":
        problem = torch_requirement_error()
        if problem is not None:
            raise ImportError(problem)
        from structalign.inference.predictor import Predictor

        return Predictor
    if name == "OnnxPredictor":
        from structalign.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'structalign' has no attribute {name!r}")
