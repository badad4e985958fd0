"""The gradient noise scale of a run's model on its own training data: the global batch beyond which a larger batch
no longer buys proportionally fewer steps (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

B_simple = tr(Sigma) / |G|^2, with G the true gradient of the training loss and Sigma the covariance of one image's
gradient, estimated as in that paper's appendix A from the gradients of K micro-batches of b images (the micro-batch
of a training step, so BatchNorm sees what it sees in training) and of their mean (K x b images):

    |G|^2   ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B),   B = K b

By that model a run at global batch B needs E_min (1 + B / B_noise) images and S_min (1 + B_noise / B) steps to reach
a given loss, so at equal epochs a batch well above B_noise falls behind whatever its learning rate.

    .venv/bin/python benchmarks/gradient_noise_scale.py --init benchmarks/out/large_batch/batch*/last.pt
"""
import argparse
import functools
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.data import make_loader, mean_crop_landmarks, open_dataset, split_validation  # noqa: E402
from structalign.engine.checkpoint import build_from_args, load_checkpoint  # noqa: E402
from structalign.engine.config import config_from_dict  # noqa: E402
from structalign.losses import build_criterion  # noqa: E402
from structalign.models import build_model  # noqa: E402

COLUMNS = ["model", "step", "val_nme", "grad_sq", "trace_sigma", "b_simple", "b_simple_range"]


def squared_norms(model, criterion, batches, count: int, visibility: bool) -> tuple:
    """(mean over `count` micro-batches of |gradient|^2, |mean gradient|^2), in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, squares = None, 0.0
    for _ in range(count):
        batch = next(batches)
        pred, vis = model(batch.images)
        loss, _ = criterion(pred.float(), batch.landmarks, None, vis if visibility else None, batch.visibility)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)  # a head without labels
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        squares += float(flat.dot(flat))
        total = flat if total is None else total + flat
    mean = total / count
    return squares / count, float(mean.dot(mean))


def training_split(cfg):
    """(the dataset, its training split) as the run saw them; read once for all the checkpoints that share them."""
    d = cfg.data
    return _training_split(d.root, d.format, d.train_split, d.face_box, d.scheme, d.val_fraction, cfg.train.seed)


@functools.lru_cache(maxsize=None)
def _training_split(root, fmt, split, face_box, scheme, val_fraction, seed):
    full = open_dataset(root, fmt=fmt, split=split, face_box=face_box, scheme=scheme)
    return full, split_validation(full, fraction=val_fraction, seed=seed)[0] if val_fraction > 0 else full


def loader_of(cfg, dataset, batch_size: int, train: bool):
    """The run's CPU loader of dataset: augmented (train=True) or not."""
    return make_loader(dataset, batch_size, train=train, device=torch.device("cpu"), image_size=cfg.data.image_size,
                       backend="reference", num_threads=0, seed=cfg.train.seed, balance=cfg.data.balance if train
                       else None, augment=cfg.data.augment if train else None, drop_last=train,
                       padding=cfg.data.crop_padding)


def unbiased(small_sq: float, big_sq: float, small: int, big: int) -> tuple:
    """(|G|^2, tr(Sigma)) from the mean squared gradient norm at batch `small` and the squared norm at batch `big`."""
    return (big * big_sq - small * small_sq) / (big - small), (small_sq - big_sq) / (1 / small - 1 / big)


def noise_scale(name: str, model, state_or_none, cfg, args) -> dict:
    """The table row of one model: B_simple from args.repeats independent draws of args.batches micro-batches."""
    full, train_ds = training_split(cfg)
    loader = loader_of(cfg, train_ds, args.micro_batch, train=True)
    criterion = build_criterion(scheme=full.scheme, check_targets=False, **cfg.loss.criterion_args())
    model.train()
    small, big = args.micro_batch, args.micro_batch * args.batches
    grad_sq, traces, scales = [], [], []
    for repeat in range(args.repeats):
        small_sq, big_sq = squared_norms(model, criterion, iter(loader.epoch(repeat)), args.batches,
                                         full.has_visibility_labels)
        true_sq, trace = unbiased(small_sq, big_sq, small, big)
        grad_sq.append(true_sq)
        traces.append(trace)
        scales.append(trace / true_sq)
    validated = state_or_none is not None and math.isfinite(state_or_none["best_nme"])
    return {"model": name, "step": state_or_none["step"] if state_or_none else 0,
            "val_nme": state_or_none["best_nme"] if validated else None,
            "grad_sq": statistics.median(grad_sq), "trace_sigma": statistics.median(traces),
            "b_simple": statistics.median(scales), "b_simple_range": f"{min(scales):.0f}-{max(scales):.0f}",
            "b_simple_each": scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of runs (their config gives data and loss)")
    parser.add_argument("--init", action="store_true",
                        help="also the untrained model of the first checkpoint's config (mean-shape start)")
    parser.add_argument("--micro-batch", type=int, default=16, help="b: images per micro-batch")
    parser.add_argument("--batches", type=int, default=128, help="K: micro-batches per estimate")
    parser.add_argument("--repeats", type=int, default=3, help="independent estimates per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model")
    parser.add_argument("--json", help="write the rows and settings here")
    args = parser.parse_args()
    if args.batches < 2:
        raise SystemExit("--batches must be at least 2")
    rows = []
    states = [(path, load_checkpoint(path)) for path in args.checkpoints]
    if args.init:
        cfg = config_from_dict(states[0][1]["config"])
        full, train_ds = training_split(cfg)
        shape = mean_crop_landmarks(loader_of(cfg, train_ds, cfg.train.eval_batch_size, train=False))
        torch.manual_seed(args.seed)
        model = build_model(cfg.model, full.scheme, cfg.data.image_size, mean_shape=shape)
        rows.append(noise_scale("untrained", model, None, cfg, args))
    for path, state in states:
        model = build_from_args(state["model_args"])
        model.load_state_dict(state["model"])
        rows.append(noise_scale(path, model, state, config_from_dict(state["config"]), args))
        print(f"gradient_noise_scale: {path}: B_simple {rows[-1]['b_simple']:.0f}", flush=True)
    print(f"\ngradient noise scale ({device_name(torch.device('cpu'))}; {args.repeats} estimates of "
          f"{args.batches} x {args.micro_batch} images each; median, range)")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, rows, torch.device("cpu"), settings=vars(args))


if __name__ == "__main__":
    main()
