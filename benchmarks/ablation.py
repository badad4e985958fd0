"""The paper's robustness claim at small scale: FC baseline, L-GRN with the static and the dynamic (per
image) adjacency, and L-GRN whose edges from likely occluded neighbours weigh less (the visibility gate), at the same
budget, data and seed, repeated over seeds.

Every variant is the demo configuration (trained with random occlusion, and with the visibility head on the built-in
data's exact per-landmark occluder labels); the FC baseline drops the relative-location loss, as the paper's
baseline does. Each trained model is evaluated on
    test        the held-out built-in test split as rendered (occluders on ~20 % of the faces)
    occluded    the 300 test faces rendered again with occluders on every face (--occluded-data; the same pose,
                expression and placement, while the draws after the occluders, lighting and blur, differ), whose
                covered points (exact, from the rendering) give the NME on occluded points: the robustness figure
    rectangle   the test split with one random occluding rectangle per face (the training augmentation, p = 1)

    .venv/bin/python benchmarks/ablation.py                               # 5 variants x 2 seeds, ~25 min, 2 cores
    .venv/bin/python benchmarks/ablation.py --epochs 4 --seeds 0 --variants fc static train.batch_size=16
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign import render  # noqa: E402
from structalign.data import AugmentConfig, make_loader, open_dataset  # noqa: E402
from structalign.data.synth import render_dataset  # noqa: E402
from structalign.engine.checkpoint import model_from_checkpoint  # noqa: E402
from structalign.engine.config import load_config  # noqa: E402
from structalign.engine.distributed import DistEnv  # noqa: E402
from structalign.engine.evaluate import evaluate  # noqa: E402
from structalign.engine.train import train  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = {  # key: (name, overrides)
    "fc": ("FC baseline", ["model.arch=fc", "loss.relative=null"]),
    "static": ("L-GRN static", ["model.arch=lgrn", "model.adjacency=static"]),
    "dynamic": ("L-GRN dynamic", ["model.arch=lgrn", "model.adjacency=dynamic"]),
    "static_gate": ("L-GRN static + visibility gate",
                    ["model.arch=lgrn", "model.adjacency=static", "model.visibility_gate=true"]),
    "dynamic_gate": ("L-GRN dynamic + visibility gate",
                     ["model.arch=lgrn", "model.adjacency=dynamic", "model.visibility_gate=true"]),
}
# Only the occluder: no rotation, zoom, shift, mirror or colour change, so the rectangle test is the clean one plus it.
OCCLUDER_ONLY = AugmentConfig(rotation=0.0, scale=(1.0, 1.0), translation=0.0, flip=0.0, occlusion=1.0,
                              brightness=0.0, contrast=0.0, saturation=0.0)
COLUMNS = ["variant", "seed", "test_nme", "test_fr", "occl_nme", "occl_fr", "occl_nme_occluded_pts",
           "occl_nme_visible_pts", "occl_heavy_faces", "occl_heavy_nme", "occl_heavy_fr", "occl_auroc",
           "rect_nme_occluded_pts", "rect_nme_visible_pts"]


def evaluate_sets(checkpoint: str, cfg, sets: dict) -> dict:
    """Metrics of a checkpoint on each named test set {name: (dataset, augment or None)}, at the run's crop."""
    model, _ = model_from_checkpoint(checkpoint)
    env = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)
    out = {}
    for name, (dataset, augment) in sets.items():
        loader = make_loader(dataset, cfg.train.eval_batch_size, train=augment is not None, device="cpu",
                             image_size=cfg.data.image_size, backend="reference", num_threads=1, seed=1234,
                             augment=augment, drop_last=False, padding=cfg.data.crop_padding)
        result = evaluate(model, loader, dataset, env, nullcontext)
        out[name] = (result.summary(), result.errors)
    return out


def run_variant(key: str, seed: int, args, sets: dict) -> dict:
    name, overrides = VARIANTS[key]
    out = os.path.join(args.out, f"{key}_seed{seed}")
    cfg = load_config("demo", [f"data.root={args.data}", f"train.out_dir={out}", f"train.seed={seed}",
                               f"train.epochs={args.epochs}", "train.progress=false", *args.overrides, *overrides])
    result = train(cfg)
    metrics = evaluate_sets(result.best_checkpoint or result.last_checkpoint, cfg, sets)
    test, occl, rect = (metrics[k][0] for k in ("test", "occluded", "rectangle"))
    heavy = occl["heavy_occlusion"]
    return {"key": key, "variant": name, "seed": seed, "steps": result.steps, "val_nme": result.best_nme,
            "test_nme": test["nme"], "test_fr": test["fr"], "test_auroc": test["visibility_auroc"],
            "occl_nme": occl["nme"], "occl_fr": occl["fr"], "occl_nme_occluded_pts": occl["nme_occluded"],
            "occl_nme_visible_pts": occl["nme_visible"], "occl_heavy_faces": heavy["count"],
            "occl_heavy_nme": heavy["nme"], "occl_heavy_fr": heavy["fr"], "occl_auroc": occl["visibility_auroc"],
            "rect_nme_occluded_pts": rect["nme_occluded"], "rect_nme_visible_pts": rect["nme_visible"],
            "_occl_errors": metrics["occluded"][1].tolist()}


def means(rows: list) -> list:
    """One row per variant: the mean over its seeds of every numeric column."""
    table = []
    for key in dict.fromkeys(r["key"] for r in rows):
        mine = [r for r in rows if r["key"] == key]
        row = {"variant": mine[0]["variant"], "seed": "mean of " + ",".join(str(r["seed"]) for r in mine)}
        for column in COLUMNS[2:]:
            values = [r[column] for r in mine if r[column] is not None]
            row[column] = float(np.mean(values)) if values else None
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="demo-config overrides applied to every variant")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "synth-demo"))
    parser.add_argument("--occluded-data", default=os.path.join(ROOT, "data", "synth-demo-occluded"),
                        help="the test identities rendered with occluders on every face (made if missing)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "ablation"))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        render_dataset(args.data, 1500, 300, seed=0)
    if not os.path.isdir(args.occluded_data):
        render_dataset(args.occluded_data, 0, 300, seed=0, occlusion=1.0)
    cfg = load_config("demo", [f"data.root={args.data}", *args.overrides])
    test = open_dataset(args.data, fmt=cfg.data.format, split=cfg.data.test_split)
    occluded = open_dataset(args.occluded_data, fmt=cfg.data.format, split="test")
    sets = {"test": (test, None), "occluded": (occluded, None), "rectangle": (test, OCCLUDER_ONLY)}
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for key in args.variants:
            rows.append(run_variant(key, seed, args, sets))
            print(f"ablation: {VARIANTS[key][0]}, seed {seed} done", flush=True)
            write_json(os.path.join(args.out, "ablation.json"), [{k: v for k, v in r.items() if k[0] != "_"}
                                                                 for r in rows], torch.device("cpu"))
    render.plot_ced({f"{r['variant']} (seed {r['seed']})": r["_occl_errors"] for r in rows},
                    os.path.join(args.out, "ced_occluded.png"))
    with open(os.path.join(args.out, "ablation_errors.json"), "w") as f:
        json.dump({f"{r['key']}_seed{r['seed']}": np.round(r["_occl_errors"], 6).tolist() for r in rows}, f)
    print(f"\nablation on {args.data} and {args.occluded_data} ({device_name(torch.device('cpu'))}), {args.epochs} "
          f"epochs each, seeds {args.seeds}, overrides {args.overrides}; NME/FR in %, inter-ocular")
    print_table(rows, COLUMNS)
    table = means(rows)
    print()
    print_table(table, COLUMNS)
    base = next((r for r in table if r["variant"] == VARIANTS["fc"][0]), None)
    if base is not None and base["occl_nme_occluded_pts"]:
        for r in table:
            ours, fc = r["occl_nme_occluded_pts"], base["occl_nme_occluded_pts"]
            print(f"{r['variant']}: occluded-point NME {ours:.3f} vs FC {fc:.3f} ({100 * (ours / fc - 1):+.1f} %)")
    write_json(os.path.join(args.out, "ablation.json"), [{k: v for k, v in r.items() if k[0] != "_"} for r in rows],
               torch.device("cpu"), epochs=args.epochs, seeds=args.seeds, overrides=args.overrides, means=table)


if __name__ == "__main__":
    main()
