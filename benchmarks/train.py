"""Training throughput: images/s of the whole step (data, forward + loss, backward, optimiser) with its breakdown, and
a 2-process DDP run against 1 process (gloo on CPU, NCCL on GPUs), all measured side by side in one run.

    .venv/bin/python benchmarks/train.py                       # built-in data (rendered into data/synth-bench)
    .venv/bin/python benchmarks/train.py --steps 30 --no-ddp

The breakdown times each phase of the training step as train.py runs it, synchronising the device between phases
(so phases do not overlap as they would in a real run; the "step" column is the sum). The DDP comparison runs
structalign.engine.train.train itself, once in one process and once under `torchrun --standalone --nproc_per_node=2`,
for one epoch of the same config, and reports the images/s train() measured (all ranks together).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.data import AugmentConfig, make_loader, open_dataset  # noqa: E402
from structalign.engine.config import load_config  # noqa: E402
from structalign.engine.optim import build_optimizer  # noqa: E402
from structalign.engine.train import autocast_for, train  # noqa: E402
from structalign.losses import build_criterion  # noqa: E402
from structalign.models import build_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CASES = {  # name: (backbone, image size, batch)
    "r18 128px": ("resnet18", 128, 32),
    "paper r34 256px": ("resnet34", 256, 16),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_breakdown(data_root: str, case: str, loader_backend: str, steps: int, device: torch.device) -> dict:
    """Median ms per phase of the L-GRN + relative-loss training step over `steps` steps (after 2 warm-up steps)."""
    backbone, size, batch = CASES[case]
    ds = open_dataset(data_root, fmt="wflw", split="train")
    loader = make_loader(ds, batch, train=True, device=device, image_size=size, backend=loader_backend,
                         num_threads=2, augment=AugmentConfig())
    model = build_model("lgrn", backbone, ds.scheme, image_size=size).to(device).train()
    criterion = build_criterion("soft_wing", relative="laplacian", scheme=ds.scheme).to(device)
    cfg = load_config("demo", check_data=False).optim
    optimizer = build_optimizer(model, cfg, cfg.lr)
    autocast = autocast_for("bf16", device)
    phases = {"data": [], "forward": [], "backward": [], "optimiser": []}
    batches = iter(loader.epoch(0))
    for i in range(steps + 2):
        t0 = time.perf_counter()
        try:
            b = next(batches)
        except StopIteration:
            batches = iter(loader.epoch(i))
            b = next(batches)
        _sync(device)
        t1 = time.perf_counter()
        with autocast():
            pred = model(b.images)
        loss, _ = criterion(pred.float(), b.landmarks)
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        if i >= 2:
            for name, (a, c) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                phases[name].append((c - a) * 1e3)
    ms = {name: sorted(v)[len(v) // 2] for name, v in phases.items()}
    total = sum(ms.values())
    return {"case": case, "loader": loader_backend, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()},
            "step_ms": total, "images_per_s": batch * 1e3 / total, "data_share": ms["data"] / total}


def _ddp_worker(out_json: str, overrides: list) -> None:
    """Run train() on the demo config (one process, or one rank under torchrun); rank 0 writes the result."""
    result = train(load_config("demo", overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as f:
            json.dump({"images_per_s": result["images_per_s"], "steps": result["steps"]}, f)


def ddp_comparison(data_root: str, images: int, batch: int) -> list:
    """One epoch of the demo config on `images` training images, 1 process vs torchrun with 2 (same per-rank batch)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = os.path.join(tmp, "data")
        _subset_dataset(data_root, subset, images)
        overrides = [f"data.root={subset}", f"train.out_dir={tmp}", "train.epochs=1", f"train.batch_size={batch}",
                     "data.val_fraction=0.0", "data.loader=reference", "data.num_threads=1", "train.log_every=1000",
                     f"optim.base_batch_size={batch}"]
        for procs in (1, 2):
            out = os.path.join(tmp, f"result{procs}.json")
            worker = [os.path.abspath(__file__), "--ddp-worker", out, *overrides]
            if procs == 1:
                cmd = [sys.executable, *worker]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                       *worker]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, torch.get_num_threads() // procs)))
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            with open(out) as f:
                result = json.load(f)
            rows.append({"processes": procs, "backend": "gloo" if not torch.cuda.is_available() else "nccl",
                         "batch_per_rank": batch, "steps": result["steps"], "images_per_s": result["images_per_s"],
                         "wall_s": wall})
    for row in rows:
        row["vs_1_process"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def _subset_dataset(source: str, target: str, images: int) -> None:
    """A WFLW-layout copy of the first `images` training faces of source (annotation lines only; images linked)."""
    from structalign.data.wflw import annotation_path

    os.makedirs(target)
    with open(annotation_path(source, "train")) as f:
        lines = [line for line in f if line.strip()][:images]
    images_dir = os.path.join(source, "WFLW_images")
    os.symlink(os.path.abspath(images_dir), os.path.join(target, "WFLW_images"))
    with open(os.path.join(target, "list_98pt_rect_attr_train.txt"), "w") as f:
        f.writelines(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "synth-bench"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ddp-images", type=int, default=384)
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "train.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.isdir(args.data):
        from structalign.data.synth import render_dataset

        print(f"rendering the built-in data into {args.data}", flush=True)
        render_dataset(args.data, 512, 64, seed=0)
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    rows = []
    from structalign.data.dali_pipeline import dali_available

    backends = ("reference", "dali") if dali_available() else ("reference",)
    for case in CASES:
        for backend in backends:
            rows.append(step_breakdown(args.data, case, backend, args.steps, device))
    print("\ntraining step (L-GRN + relative-location loss, AdamW), median over", args.steps, "steps")
    print_table(rows, ["case", "loader", "batch", "data_ms", "forward_ms", "backward_ms", "optimiser_ms", "step_ms",
                       "images_per_s", "data_share"])
    ddp = [] if args.no_ddp else ddp_comparison(args.data, args.ddp_images, batch=16)
    if ddp:
        print("\nDDP: one epoch of the demo config, 1 process vs 2 (same batch per rank)")
        print_table(ddp, ["processes", "backend", "batch_per_rank", "steps", "images_per_s", "wall_s",
                          "vs_1_process"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    write_json(args.json, rows + ddp, device)


if __name__ == "__main__":
    main()
