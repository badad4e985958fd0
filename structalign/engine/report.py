"""Evaluation of a checkpoint on a dataset split, and the files it writes: metrics JSON, Markdown report, per-image
error CSV, CED plot and landmark overlays (the pictures drawn by structalign.render).

    structalign eval runs/demo/best.pt --data data/synth-demo --out runs/demo/eval
"""
import csv
import json
import os

import numpy as np

from structalign import metrics
from structalign.data import make_loader, open_dataset
from structalign.engine.checkpoint import model_from_checkpoint
from structalign.engine.distributed import setup_distributed, teardown_distributed
from structalign.engine.evaluate import EvalResult, evaluate
from structalign.engine.precision import autocast_for
from structalign.errors import InputError, MissingFileError
from structalign.landmarks import resolve_scheme
from structalign.render import plot_ced, save_overlay


NORM_TEXT = {"inter_ocular": "the inter-ocular distance (outer eye corners)",
             "inter_pupil": "the inter-pupil distance (eye centres)",
             "box": "the landmark box size sqrt(width * height)"}


def write_report(result: EvalResult, dataset, out_dir: str, title: str, overlays: int = 8,
                 norm: str = "inter_ocular") -> dict:
    """Write metrics.json, report.md, per_image.csv, ced.png and a few overlays (worst, median and best images);
    errors are normalised by `norm`."""
    os.makedirs(out_dir, exist_ok=True)
    summary = result.summary()
    subsets = _subsets(result, dataset)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"title": title, "norm": norm, "summary": summary, "subsets": _plain(subsets)}, f, indent=1)
    with open(os.path.join(out_dir, "per_image.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "image", "nme"])
        for i, err in enumerate(result.errors):
            writer.writerow([i, dataset[i].image_path, f"{err:.6f}"])
    plot_ced({title: result.errors}, os.path.join(out_dir, "ced.png"))
    order = np.argsort(result.errors)
    ranks = np.linspace(0, len(order) - 1, min(overlays, len(order))).round().astype(int)
    picks = sorted({int(order[k]) for k in ranks})
    pictures = []
    for i in picks:
        name = f"overlay_{i:05d}_nme{100 * result.errors[i]:.2f}.png"
        save_overlay(dataset[i].image_path, os.path.join(out_dir, name), points=[result.predictions[i]],
                     reference=[result.targets[i]])
        pictures.append(name)
    lines = [f"# {title}", "", "| images | NME % | FR@0.1 % | AUC@0.1 |", "|---|---|---|---|",
             f"| {summary['images']} | {summary['nme']:.3f} | {summary['fr']:.2f} | {summary['auc']:.4f} |", "",
             f"NME normalised by {NORM_TEXT[norm]}; FR and AUC at 0.1.", ""]
    lines += occlusion_lines(summary)
    if subsets:
        keys = list(next(iter(subsets.values())).keys())
        lines += ["| subset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_num(row[k]) for k in keys) + " |" for name, row in subsets.items()]
        lines.append("")
    lines += ["![CED](ced.png)", "", "Red: prediction, green: ground truth.", ""]
    lines += [f"![{p}]({p})" for p in pictures]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"summary": summary, "subsets": _plain(subsets), "overlays": [os.path.join(out_dir, p) for p in pictures]}


def evaluate_checkpoint(checkpoint: str, root: str, fmt: str = "wflw", split: str = "test",
                        out_dir: str | None = None, weights: str = "ema", batch_size: int = 64,
                        loader: str = "reference", device: str = "auto", norm: str = "inter_ocular") -> dict:
    """Evaluate a checkpoint on a split (all ranks under torchrun); rank 0 writes the report when out_dir is given.
    norm: the NME normaliser, "inter_ocular", "inter_pupil" (as COFW is usually reported) or "box"."""
    if norm not in NORM_TEXT:
        raise InputError(f"--norm must be one of {sorted(NORM_TEXT)}, got {norm!r}")
    if not os.path.isdir(root):
        raise MissingFileError(f"--data: {root!r} is not a directory")
    env = setup_distributed(device)
    try:
        model, state = model_from_checkpoint(checkpoint, weights=weights, device=env.device)
        # The crop the model was trained with (checkpoints from before data.crop_padding: 1.25).
        data_cfg = state["config"]["data"]
        # The checkpoint's own scheme (it carries the content): the data must have its point count.
        dataset = open_dataset(root, fmt=fmt, split=split, face_box=data_cfg.get("face_box", "annotation"),
                               scheme=resolve_scheme(state["model_args"]["scheme"]))
        data = make_loader(dataset, batch_size, train=False, device=env.device,
                           image_size=state["model_args"]["image_size"], backend=loader, shard_id=env.rank,
                           num_shards=env.world_size, drop_last=False, padding=data_cfg.get("crop_padding", 1.25))
        precision = state["config"]["train"]["precision"]
        result = evaluate(model, data, dataset, env, autocast_for(precision, env.device), norm=norm)
        title = f"{os.path.basename(os.path.normpath(root))} {split}"
        if out_dir is not None and env.is_main:
            return write_report(result, dataset, out_dir, title, norm=norm)
        return {"summary": result.summary()}
    finally:
        teardown_distributed(env)


def occlusion_lines(summary: dict) -> list:
    """Markdown lines of the occlusion table of an EvalResult.summary(); none where no point carries a label."""
    heavy = summary["heavy_occlusion"]
    if heavy is None:
        return []
    return [f"| NME occluded points % | NME visible points % | faces >= {100 * metrics.HEAVY_OCCLUSION:.0f} % "
            f"occluded | their NME % | their FR@0.1 % | visibility AUROC |", "|---|---|---|---|---|---|",
            f"| {_num(summary['nme_occluded'])} | {_num(summary['nme_visible'])} | {heavy['count']} | "
            f"{_num(heavy['nme'])} | {_num(heavy['fr'])} | {_num(summary['visibility_auroc'])} |", "",
            "Points labelled visible or occluded by the data (points outside the crop count as neither); AUROC of "
            "the predicted P(visible) over those points.", ""]


def _subsets(result: EvalResult, dataset):
    """The per-subset table: WFLW's attribute subsets, or the subset tags the dataset's records carry; else None."""
    if result.attributes is not None:
        return metrics.subset_table(result.errors, result.attributes)
    tags = dataset.tag_flags()
    if tags is None:
        return None
    names, flags = tags
    return metrics.subset_table(result.errors, flags, names=names)


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4g}"


def _plain(value):
    """numpy scalars/arrays inside nested dicts as JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
