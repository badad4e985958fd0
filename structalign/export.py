"""ONNX export of a trained model: `structalign export CKPT model.onnx [--input crops]`.

The custom ops run on their reference (plain PyTorch) backend during export, since ONNX knows no custom ops. The graph
has the outputs "landmarks" (float32[batch, N, 2], crop pixels) and, when the model has a visibility head,
"visibility" (float32[batch, N]: P(landmark visible), the sigmoid of the head's logits taken in the graph; a
checkpoint from before the head has "landmarks" only). The batch dimension is dynamic. Its input is either
"normalised" (float32[batch, 3, S, S], normalised as the data pipeline does) or "crops" (uint8[batch, S, S, 3] RGB
crops: the normalisation is in the graph). The file is self-contained (weights inline) unless the weights pass the
2 GB protobuf limit, and carries what OnnxPredictor needs (scheme, crop size and padding, input kind) as metadata.

    .venv/bin/python -m pytest -q tests/inference/test_onnx.py
"""
import logging
import warnings

import torch

from structalign.data import NORM_MEAN, NORM_STD
from structalign.engine.checkpoint import model_from_checkpoint
from structalign.errors import InputError
from structalign.inference.onnx_predictor import INPUT_KINDS, LANDMARKS_OUTPUT, VISIBILITY_OUTPUT, write_metadata
from structalign.inference.predictor import checkpoint_inference_settings
from structalign.ops import use_backend

# protobuf refuses messages of 2 GiB and more; keep a margin for the graph itself.
INLINE_LIMIT_BYTES = 2 ** 31 - 64 * 2 ** 20


class ExportedGraph(torch.nn.Module):
    """What the ONNX graph computes: images -> landmarks [B, N, 2], or (landmarks, P(visible) [B, N]) for a model
    with a visibility head. crops=True puts the data pipeline's normalisation in front: the input is uint8 RGB crops
    [B, S, S, 3]; else normalised float32 images [B, 3, S, S]."""

    def __init__(self, model: torch.nn.Module, crops: bool):
        super().__init__()
        self.model, self.crops = model, crops
        if crops:
            self.register_buffer("mean", torch.tensor(NORM_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(NORM_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        if self.crops:
            images = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        landmarks, logits = self.model(images)
        return landmarks if logits is None else (landmarks, torch.sigmoid(logits))


class _DropExportNoise(logging.Filter):
    """Drops two harmless export messages: onnxscript's constant folder cannot evaluate a CumSum whose axis is a
    1-element tensor (the node is kept and runs in the runtime), and the torchvision ops it skips registering."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Evaluation failed") or "torchvision is not installed" in message)


def export_onnx(checkpoint: str, path: str, weights: str = "ema", opset: int = 18, input_kind: str = "normalised",
                external_data=None) -> list:
    """Write the checkpoint's model to path as ONNX (dynamic batch); returns the paths written (path, plus
    path + ".data" when the weights are stored outside). external_data: None = only when the weights exceed the
    2 GB protobuf limit, True / False to force."""
    if input_kind not in INPUT_KINDS:
        raise InputError(f"input must be one of {INPUT_KINDS}, got {input_kind!r}")
    model, state = model_from_checkpoint(checkpoint, weights=weights, op_backend="reference")
    settings = checkpoint_inference_settings(state)
    size, scheme = settings["image_size"], model.scheme
    outputs = [LANDMARKS_OUTPUT] + ([VISIBILITY_OUTPUT] if model.visibility is not None else [])
    if input_kind == "crops":
        example, name = torch.zeros(2, size, size, 3, dtype=torch.uint8), "crops"
    else:
        example, name = torch.zeros(2, 3, size, size), "images"
    model = ExportedGraph(model, crops=input_kind == "crops").eval()
    if external_data is None:
        tensors = [*model.parameters(), *model.buffers()]
        external_data = sum(t.numel() * t.element_size() for t in tensors) > INLINE_LIMIT_BYTES
    noise = _DropExportNoise()
    loggers = [logging.getLogger(n) for n in ("onnxscript.optimizer._constant_folding",
                                              "torch.onnx._internal.exporter._registration")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with use_backend("reference"), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(model, (example,), input_names=[name], output_names=outputs,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                        dynamo=True, verbose=False)
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
    write_metadata(program.model.metadata_props, scheme=scheme.to_dict(), image_size=size,
                   padding=settings["padding"], input_kind=input_kind, num_points=scheme.num_points,
                   mean=NORM_MEAN, std=NORM_STD)
    program.save(path, external_data=bool(external_data))
    return [path] + ([path + ".data"] if external_data else [])

