"""Evaluation on every rank: each rank predicts its shard, per-image results are all-reduced by dataset index.

Errors are measured in original-image pixels (predictions and targets mapped back through the inverse crop affine),
so NME does not depend on the crop size.
"""
from dataclasses import dataclass

import numpy as np
import torch

from structalign import metrics
from structalign.engine.distributed import DistEnv, all_reduce_sum


@dataclass
class EvalResult:
    """Per-image results over a whole split, in dataset order.

    errors (ndarray[M]): per-image NME (fraction of the normaliser); point_errors (ndarray[M, N]); predictions
    (ndarray[M, N, 2]) and targets in original-image pixels; visibility (ndarray[M, N] labels: 1 visible, 0
    occluded, -1 unlabelled or outside the crop); attributes (ndarray[M, 6] or None); visibility_scores
    (ndarray[M, N] predicted P(visible), or None for a model without a visibility head).
    """

    errors: np.ndarray
    point_errors: np.ndarray
    predictions: np.ndarray
    targets: np.ndarray
    visibility: np.ndarray
    attributes: np.ndarray | None
    visibility_scores: np.ndarray | None = None

    def summary(self, threshold: float = 0.1) -> dict:
        """NME and FR in %, AUC in [0, 1], images; where points carry visibility labels also nme_occluded and
        nme_visible (% over the points with that label), heavy_occlusion ({nme, fr, auc, count} of the faces with
        >= 20 % of their labelled points occluded) and visibility_auroc; each None without labels (or scores)."""
        out = {k: float(v) for k, v in metrics.summarize(self.errors, threshold=threshold).items()}
        out["images"] = int(len(self.errors))
        table = metrics.occlusion_table(self.point_errors, self.visibility, threshold)
        out.update(nme_occluded=None, nme_visible=None, heavy_occlusion=None)
        if table is not None:
            out.update(nme_occluded=table["nme_occluded"], nme_visible=table["nme_visible"],
                       heavy_occlusion=table["heavy"])
        out["visibility_auroc"] = None if self.visibility_scores is None else \
            metrics.visibility_auroc(self.visibility_scores, self.visibility)
        return out


def to_original_pixels(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Crop-pixel points (Tensor[B, N, 2]) back through the original->crop affines (Tensor[B, 2, 3])."""
    linear, shift = matrix[:, :, :2].double(), matrix[:, :, 2:].double()
    return torch.linalg.solve(linear, points.double().transpose(1, 2) - shift).transpose(1, 2)


@torch.no_grad()
def predict_split(model: torch.nn.Module, loader, num_images: int, env: DistEnv, autocast) -> dict:
    """Predictions of model over loader's epoch 0, all-reduced into arrays of num_images rows on every rank."""
    was_training = model.training
    model.eval()
    buffers = None
    for batch in loader.epoch(0):
        with autocast():
            crop_pred, visibility_logits = model(batch.images)
        pred = to_original_pixels(crop_pred.float(), batch.matrix)
        target = to_original_pixels(batch.landmarks, batch.matrix)
        if buffers is None:
            n = pred.shape[1]
            buffers = {"predictions": torch.zeros(num_images, n, 2, dtype=torch.float64, device=env.device),
                       "targets": torch.zeros(num_images, n, 2, dtype=torch.float64, device=env.device),
                       "visibility": torch.zeros(num_images, n, dtype=torch.float64, device=env.device),
                       "attributes": torch.zeros(num_images, 6, dtype=torch.float64, device=env.device),
                       "count": torch.zeros(num_images, dtype=torch.float64, device=env.device)}
            if visibility_logits is not None:
                buffers["visibility_scores"] = torch.zeros(num_images, n, dtype=torch.float64, device=env.device)
        index = batch.index.to(env.device)
        if index.numel() and (index.min() < 0 or index.max() >= num_images):
            raise IndexError(f"loader yielded dataset index {int(index.max())} outside [0, {num_images})")
        buffers["predictions"].index_add_(0, index, pred.to(env.device))
        buffers["targets"].index_add_(0, index, target.to(env.device))
        buffers["visibility"].index_add_(0, index, batch.visibility.double().to(env.device))
        if visibility_logits is not None:
            buffers["visibility_scores"].index_add_(0, index, torch.sigmoid(visibility_logits.double()).to(env.device))
        if batch.attributes is not None:
            buffers["attributes"].index_add_(0, index, batch.attributes.double().to(env.device))
        buffers["count"].index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    model.train(was_training)
    if buffers is None:
        raise ValueError("evaluation loader yielded no batches")
    for value in buffers.values():
        all_reduce_sum(value, env)
    count = buffers.pop("count")
    if (count == 0).any():
        raise RuntimeError(f"{int((count == 0).sum())} of {num_images} images were not evaluated by any rank")
    # Loaders may pad a shard with repeats of some images: average the repeats.
    return {k: (v / count.view(-1, *[1] * (v.dim() - 1))).cpu().numpy() for k, v in buffers.items()}


def evaluate(model: torch.nn.Module, loader, dataset, env: DistEnv, autocast, norm: str = "inter_ocular") -> EvalResult:
    """Per-image NME, per-point errors and predictions of model over a whole dataset (all ranks take part)."""
    arrays = predict_split(model, loader, len(dataset), env, autocast)
    scheme = dataset.scheme
    errors = np.asarray(metrics.per_image_nme(arrays["predictions"], arrays["targets"], scheme, norm=norm))
    point_errors = np.asarray(metrics.per_point_error(arrays["predictions"], arrays["targets"], scheme, norm=norm))
    has_attributes = dataset[0].attributes is not None if len(dataset) else False
    return EvalResult(errors=errors, point_errors=point_errors, predictions=arrays["predictions"],
                      targets=arrays["targets"], visibility=arrays["visibility"],
                      attributes=np.rint(arrays["attributes"]).astype(np.int64) if has_attributes else None,
                      visibility_scores=arrays.get("visibility_scores"))
