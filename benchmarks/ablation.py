"""The paper's claim at small scale: FC baseline vs L-GRN vs L-GRN + relative-location loss on the built-in data,
same budget, seed and data (the demo config, trained with random occlusion), evaluated on the held-out test split
twice: as rendered, and with one synthetic occluding rectangle per face (the training augmentation's, p = 1), where
the points under it (Batch.visibility == 0) give the NME on occluded points.

    .venv/bin/python benchmarks/ablation.py                     # ~3 x 8 min on 2 CPU cores
    .venv/bin/python benchmarks/ablation.py --epochs 4 train.batch_size=16
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
from structalign.engine.config import load_config  # noqa: E402
from structalign.engine.distributed import DistEnv  # noqa: E402
from structalign.engine.evaluate import evaluate  # noqa: E402
from structalign.engine.train import train  # noqa: E402
from structalign.engine.checkpoint import model_from_checkpoint  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = {
    "FC baseline": ["model.arch=fc", "loss.relative=null"],
    "L-GRN": ["model.arch=lgrn", "loss.relative=null"],
    "L-GRN + relative loss": ["model.arch=lgrn", "loss.relative=laplacian"],
}
# Only the occluder: no rotation, zoom, shift, mirror or colour change, so the occluded test is the clean one plus it.
OCCLUDER_ONLY = AugmentConfig(rotation=0.0, scale=(1.0, 1.0), translation=0.0, flip=0.0, occlusion=1.0,
                              brightness=0.0, contrast=0.0, saturation=0.0)


def occluded_test_loader(test, image_size: int, batch: int, seed: int):
    """The test faces with one random occluding rectangle each, drawn reproducibly from seed."""
    return make_loader(test, batch, train=True, device="cpu", image_size=image_size, backend="reference",
                       num_threads=1, seed=seed, augment=OCCLUDER_ONLY, drop_last=False)


def run_variant(name: str, overrides: list, data: str, out: str) -> dict:
    cfg = load_config("demo", [f"data.root={data}", f"train.out_dir={out}", *overrides])
    result = train(cfg)
    checkpoint = result["best_checkpoint"] or result["last_checkpoint"]
    model, _ = model_from_checkpoint(checkpoint)
    test = open_dataset(data, fmt=cfg.data.format, split=cfg.data.test_split)
    env = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)
    size, batch = cfg.data.image_size, cfg.train.eval_batch_size
    clean = evaluate(model, make_loader(test, batch, train=False, device="cpu", image_size=size,
                                        backend="reference", num_threads=1), test, env, nullcontext)
    occluded = evaluate(model, occluded_test_loader(test, size, batch, seed=1234), test, env, nullcontext)
    hidden = occluded.visibility == 0
    c, o = clean.summary(), occluded.summary()
    return {"variant": name, "steps": result["steps"], "val_nme": result["best_nme"], "nme": c["nme"], "fr": c["fr"],
            "auc": c["auc"], "occl_test_nme": o["nme"], "occl_test_fr": o["fr"],
            "nme_occluded_pts": o["nme_occluded"],
            "nme_visible_pts": float(100 * occluded.point_errors[~hidden].mean()),
            "occluded_pts_share": float(hidden.mean()), "_errors": clean.errors, "_occl_errors": occluded.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="demo-config overrides applied to every variant")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "synth-demo"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "ablation"))
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        from structalign.data.synth import render_dataset

        render_dataset(args.data, 1500, 300, seed=0)
    rows = []
    for i, (name, variant) in enumerate(VARIANTS.items()):
        overrides = [f"train.epochs={args.epochs}", *args.overrides, *variant]
        rows.append(run_variant(name, overrides, args.data, os.path.join(args.out, f"variant{i}")))
        print(f"ablation: {name} done", flush=True)
    os.makedirs(args.out, exist_ok=True)
    render.plot_ced({r["variant"]: r["_occl_errors"] for r in rows}, os.path.join(args.out, "ced_occluded.png"))
    render.plot_ced({r["variant"]: r["_errors"] for r in rows}, os.path.join(args.out, "ced.png"))
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print(f"\nablation on {args.data} ({device_name(torch.device('cpu'))}), {args.epochs} epochs each, "
          f"overrides {args.overrides}; NME/FR in %, inter-ocular")
    print_table(table, ["variant", "steps", "val_nme", "nme", "fr", "auc", "occl_test_nme", "occl_test_fr",
                        "nme_occluded_pts", "nme_visible_pts", "occluded_pts_share"])
    base = table[0]["nme_occluded_pts"]
    for r in table[1:]:
        print(f"{r['variant']}: occluded-point NME {r['nme_occluded_pts']:.3f} vs FC {base:.3f} "
              f"({100 * (r['nme_occluded_pts'] / base - 1):+.1f} %)")
    write_json(os.path.join(args.out, "ablation.json"), table, torch.device("cpu"))
    with open(os.path.join(args.out, "ablation_errors.json"), "w") as f:
        json.dump({r["variant"]: np.round(r["_errors"], 6).tolist() for r in rows}, f)


if __name__ == "__main__":
    main()
