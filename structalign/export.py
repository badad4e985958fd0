"""ONNX export of a trained model: `structalign export CKPT model.onnx`.

The custom ops run on their reference (plain PyTorch) backend during export, since ONNX knows no custom ops; the
graph takes images (float32[batch, 3, S, S], normalised as the data pipeline does) and returns landmarks
(float32[batch, N, 2]) in crop pixels. The batch dimension is dynamic.
"""
import torch

from structalign.engine.checkpoint import model_from_checkpoint
from structalign.ops import use_backend


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
