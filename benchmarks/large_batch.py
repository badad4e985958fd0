"""Does a large global batch converge as well as a small one? Global batch 32 with the demo's optimiser (AdamW,
5e-3 at 32, warm-up 0.3 epoch, cosine) against 256 and 1024 with the large-batch recipe (LAMB, warm-up, betas, the
learning rate scaled from optim.base_batch_size by optim.lr_scaling), at equal epochs on the built-in faces.

Every run is `torchrun --standalone --nproc_per_node=P -m structalign.cli train demo ...` on the CPU (gloo), with the
same micro-batch per process and train.accumulate making up the global batch (so BatchNorm sees the same batches in
every run), the demo model at --image-size px (its Soft-Wing widths scaled from the demo's 128 px), validation only
after the last epoch. The last weights are evaluated on the held-out test split; the goal is a test NME within
--tolerance (relative) of batch 32 at every larger batch.

    .venv/bin/python benchmarks/large_batch.py                   # 20 000 faces, 64 px, 4 epochs: ~1 h on 2 cores
    .venv/bin/python benchmarks/large_batch.py --train-images 512 --test-images 64 --epochs 1 --micro-batch 8
    .venv/bin/python benchmarks/large_batch.py --batches 1024 --large optim.warmup_epochs=2.0  # a recipe change
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.data.synth import render_dataset  # noqa: E402
from structalign.engine.checkpoint import load_checkpoint  # noqa: E402
from structalign.engine.config import load_config  # noqa: E402
from structalign.engine.optim import scaled_lr  # noqa: E402
from structalign.engine.report import evaluate_checkpoint  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SMALL_BATCH = 32  # the demo's global batch and optimiser: the reference every larger batch is held to
# The large-batch recipe: LAMB (per-tensor trust ratio on layer weights) at 0.02 for a global batch of 256, scaled by
# the square root of the batch, after a warm-up of one epoch, with betas (0.8, 0.999^(batch / 32)): the second moment
# remembers as many images as the demo's AdamW does at 32 (benchmarks/RESULTS.md, 2026-12-05: what was tried).
# Extra overrides (--large) are applied after these.
LARGE_BATCH_RECIPE = ["optim.name=lamb", "optim.lr=0.02", "optim.base_batch_size=256", "optim.lr_scaling=sqrt",
                      "optim.warmup_epochs=1.0"]
LARGE_BATCH_BETA1 = 0.8


def large_batch_recipe(global_batch: int) -> list:
    """The recipe's overrides at a global batch: LARGE_BATCH_RECIPE and its betas (beta2 to 3 decimals)."""
    beta2 = load_config("demo", check_data=False).optim.betas[1] ** (global_batch / SMALL_BATCH)
    return LARGE_BATCH_RECIPE + [f"optim.betas=[{LARGE_BATCH_BETA1},{beta2:.3f}]"]


DEMO_CROP = 128  # the demo config's crop side: its Soft-Wing widths are in pixels of that crop
COLUMNS = ["global_batch", "accumulate", "optimiser", "lr", "warmup_epochs", "epochs", "steps", "val_nme",
           "test_nme", "test_fr", "vs_batch_32_pct", "within_goal", "train_s"]


def run_overrides(global_batch: int, args) -> list:
    """The demo-config overrides of one run: data, model size, batch split into processes x micro-batch x
    accumulation, epochs, and for batches above 32 the large-batch recipe."""
    per_step = args.processes * args.micro_batch
    if global_batch % per_step:
        raise SystemExit(f"global batch {global_batch} is not a multiple of processes x micro-batch = {per_step}")
    scale = args.image_size / DEMO_CROP
    cfg = load_config("demo", check_data=False)
    widths = {k: v * scale for k, v in cfg.loss.params.model_dump().items()}
    overrides = [f"data.root={args.data}", f"data.image_size={args.image_size}", "data.num_threads=0",
                 *(f"loss.params.{k}={v}" for k, v in widths.items()),
                 f"train.batch_size={args.micro_batch}", f"train.accumulate={global_batch // per_step}",
                 f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.seed={args.seed}",
                 "train.log_every=20", "train.progress=false", "train.tensorboard=false", "train.device=cpu"]
    if global_batch > SMALL_BATCH:
        overrides += large_batch_recipe(global_batch) + args.large
    return overrides + args.overrides


def train_and_test(global_batch: int, args) -> dict:
    """One run under torchrun, then its last weights on the test split; a row of the table."""
    out = os.path.join(args.out, f"batch{global_batch}")
    overrides = [*run_overrides(global_batch, args), f"train.out_dir={out}"]
    cfg = load_config("demo", overrides)
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
           "-m", "structalign.cli", "train", "demo", *overrides]
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    start = time.perf_counter()
    with open(os.path.join(out, "train.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    train_s = time.perf_counter() - start
    last = os.path.join(out, "last.pt")
    state = load_checkpoint(last)
    test = evaluate_checkpoint(last, args.data, fmt="wflw", split="test", weights="model", device="cpu",
                               batch_size=cfg.train.eval_batch_size)["summary"]
    return {"global_batch": global_batch, "processes": args.processes, "micro_batch": args.micro_batch,
            "accumulate": cfg.train.accumulate, "optimiser": cfg.optim.name, "lr_scaling": cfg.optim.lr_scaling,
            "lr": scaled_lr(cfg.optim, global_batch), "warmup_epochs": cfg.optim.warmup_epochs,
            "epochs": cfg.train.epochs, "steps": state["step"], "val_nme": state["best_nme"], "test_nme": test["nme"],
            "test_fr": test["fr"], "train_s": round(train_s, 1), "overrides": overrides}


def compare(rows: list, tolerance: float) -> None:
    """Add each row's test NME relative to batch 32 (in %) and whether it is within the tolerance."""
    base = next((r["test_nme"] for r in rows if r["global_batch"] == SMALL_BATCH), None)
    for r in rows:
        r["vs_batch_32_pct"] = None if base is None else 100 * (r["test_nme"] / base - 1)
        r["within_goal"] = None if base is None else ("yes" if r["test_nme"] <= base * (1 + tolerance) else "no")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="demo-config overrides applied to every run")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024], help="global batches to run")
    parser.add_argument("--large", nargs="*", default=[], metavar="section.key=value",
                        help="overrides of the large-batch recipe (batches above 32 only)")
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--render-size", type=int, default=96, help="side of the rendered images (px)")
    parser.add_argument("--image-size", type=int, default=64, help="crop side the model sees (px)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=16, help="images per process per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.05, help="goal: test NME <= (1 + tolerance) x batch 32")
    parser.add_argument("--data", help="built-in data folder (rendered if missing; default by image count and size)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "large_batch"))
    parser.add_argument("--json", help="write the rows and settings here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.data = args.data or os.path.join(ROOT, "data", f"synth-{args.train_images}-{args.render_size}px")
    if not os.path.isdir(args.data):
        start = time.perf_counter()
        render_dataset(args.data, args.train_images, args.test_images, seed=0, width=args.render_size,
                       height=args.render_size)
        print(f"large_batch: rendered {args.train_images} + {args.test_images} faces at {args.render_size} px into "
              f"{args.data} in {time.perf_counter() - start:.0f} s", flush=True)
    recipes = {b: large_batch_recipe(b) for b in args.batches if b > SMALL_BATCH}
    rows = []
    for global_batch in args.batches:
        rows.append(train_and_test(global_batch, args))
        r = rows[-1]
        print(f"large_batch: global batch {global_batch}: {r['steps']} steps, test NME {r['test_nme']:.3f}% in "
              f"{r['train_s']:.0f} s", flush=True)
        compare(rows, args.tolerance)
        if args.json:
            write_json(args.json, rows, torch.device("cpu"), epochs=args.epochs, settings=vars(args),
                       large_batch_recipe=recipes)
    print(f"\nlarge_batch on {args.data} ({device_name(torch.device('cpu'))}; {args.processes} processes x "
          f"{args.micro_batch} images per micro-batch); NME/FR in %, inter-ocular, held-out test split")
    for global_batch, recipe in recipes.items():
        print(f"large-batch recipe at {global_batch}: {' '.join(recipe + args.large)}")
    print_table(rows, COLUMNS)
    failed = [r["global_batch"] for r in rows if r["within_goal"] == "no"]
    if any(r["within_goal"] is not None for r in rows):
        print(f"goal (test NME within {100 * args.tolerance:.0f} % of batch 32): "
              f"{'not met at batch ' + ', '.join(map(str, failed)) if failed else 'met'}")


if __name__ == "__main__":
    main()
