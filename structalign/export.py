"""ONNX export of a trained model: `structalign export CKPT model.onnx`.

The custom ops run on their reference (plain PyTorch) backend during export, since ONNX knows no custom ops; the
graph takes images (float32[batch, 3, S, S], normalised as the data pipeline does) and returns landmarks
(float32[batch, N, 2]) in crop pixels. The batch dimension is dynamic.
"""
import torch

from structalign.engine.checkpoint import load_checkpoint
from structalign.models import build_model
from structalign.ops import use_backend


def model_from_checkpoint(path: str, weights: str = "ema", op_backend: str | None = None,
                          device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint in eval mode, with its EMA weights where it has them (weights="ema") or the raw
    ones (weights="model"); returns (model, checkpoint)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = load_checkpoint(path, map_location=device)
    args = dict(state["model_args"])
    if op_backend is not None:
        args["op_backend"] = op_backend
    model = build_model(**args)
    if weights == "ema" and state.get("ema") is not None:
        model.load_state_dict(state["ema"]["module"])
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def export_onnx(checkpoint: str, path: str, weights: str = "ema", opset: int = 18) -> str:
    """Write the checkpoint's model to path as ONNX (dynamic batch); returns path."""
    model, state = model_from_checkpoint(checkpoint, weights=weights, op_backend="reference")
    size = state["model_args"]["image_size"]
    example = torch.zeros(2, 3, size, size)
    with use_backend("reference"), torch.no_grad():
        torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["landmarks"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                          verbose=False)
    return path
