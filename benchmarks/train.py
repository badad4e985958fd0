"""Training throughput of the real loop (structalign.engine.train.train): images/s and the share of wall time spent
waiting for data, the cost of a host read every step, a per-phase breakdown, and 2-process DDP against 1 process.

    python benchmarks/train.py                  # GPU: the paper's ResNet-34 L-GRN, 256 px, bf16, 256 images per GPU
    python benchmarks/train.py --steps 200 --sections loop --json out.json      (what `make gpu-check` runs)
    python benchmarks/train.py --steps 200 --sections loader --json out.json    (data wait with the real loaders)
    python benchmarks/train.py --dry-run        # tiny sizes on the CPU: proves every section runs

Sections (--sections, comma list):
  loop       train() on the case's config for --steps steps (one epoch), its GPU defaults included (wflw_lgrn_r34:
             bf16 autocast, channels_last, fused SGD, cudnn.benchmark; --compile adds torch.compile). Data: DALI on
             the GPU when DALI is installed (decode + augment of the built-in faces, as in `loader`), and GPU-resident
             synthetic batches (a pool of random images and landmarks on the device: no data cost); the `data` column
             says which. images/s and the data-wait share are what train() itself measures between its sync points,
             the first log interval (warm-up) left out.
  loader     the same loop fed by the real loaders that train() builds from the config (data.loader: the reference
             pipeline, numpy + PIL in --loader-threads DataLoader workers, and DALI when installed), one epoch of
             --steps batches whose training list cycles through the built-in faces (each decoded and augmented from
             its JPEG), beside the synthetic batches of the same run: images/s, the data-wait share (the share of the
             wall time train() spends in next(batches)) and images/s against the data-free loop. Goal on one GPU: a
             data-wait share under 5 % at 5000 images/s (ResNet-34 L-GRN, 256 px, bf16). On a CPU the loader's
             workers share the cores with the step, so its figures are the CPU's, not the goal's.
  sync       the same loop with a host read of the losses after every step (train.log_every=1) against reads
             every --log-every steps, side by side in one run.
  breakdown  median ms per phase of the step (data, forward + loss, backward, optimiser), the device synchronised
             between phases (so phases do not overlap as in a real run; "step" is their sum).
  ddp        one epoch of the demo config in 1 process against `torchrun --nproc_per_node=2` (gloo on CPU, NCCL on
             GPUs), images/s as train() measured them (all ranks together).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.data import AugmentConfig, make_loader, open_dataset  # noqa: E402
from structalign.data.batches import Batch  # noqa: E402
from structalign.data.dali_pipeline import dali_available  # noqa: E402
from structalign.engine.config import load_config  # noqa: E402
from structalign.engine.config_schema import ModelConfig  # noqa: E402
from structalign.engine.optim import build_optimizer  # noqa: E402
from structalign.engine.precision import autocast_for  # noqa: E402
from structalign.engine.train import train  # noqa: E402
from structalign.losses import build_criterion  # noqa: E402
from structalign.models import build_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGET_IMAGES_PER_S = 5000  # one H100/H200, the paper's model at 256 px
CASES = {  # name: (shipped config, overrides, per-GPU batch)
    "paper r34 256px": ("wflw_lgrn_r34", [], 256),
    "demo r18/2 128px": ("demo", [], 32),
    "tiny": ("demo", ["model.backbone_width=8", "model.head_width=16", "model.num_blocks=1", "data.image_size=64"], 8),
}
SECTIONS = {"loop", "sync", "breakdown", "ddp", "loader"}
BREAKDOWN_CASES = {  # name: (backbone, image size, batch)
    "r18 128px": ("resnet18", 128, 32),
    "paper r34 256px": ("resnet34", 256, 16),
}


class DeviceBatches:
    """A loader (len, epoch(e, start_batch)) of `steps` batches per epoch cycled from a pool of random batches
    resident on the device: the training step with no data cost."""

    def __init__(self, batch_size: int, image_size: int, points: int, steps: int, device, pool: int = 4):
        g = torch.Generator().manual_seed(0)
        self.steps = steps
        self.pool = [Batch(images=torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                           landmarks=(torch.rand(batch_size, points, 2, generator=g) * image_size).to(device),
                           visibility=torch.ones(batch_size, points, device=device),
                           index=torch.arange(batch_size, device=device),
                           matrix=torch.eye(2, 3).expand(batch_size, 2, 3).contiguous().to(device), attributes=None,
                           in_crop=torch.ones(batch_size, points, device=device))
                     for _ in range(pool)]

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_batch: int = 0):
        for i in range(start_batch, self.steps):
            yield self.pool[i % len(self.pool)]


def run_loop(case: str, data_root: str, data: str, steps: int, log_every: int, device: torch.device,
             compile_model: bool, loader_threads: int | None = None) -> dict:
    """One epoch of `steps` steps of train() on the case's config; the row of the loop/sync/loader tables.

    data: "device-synthetic" (DeviceBatches), or a loader backend ("reference", "dali") that train() builds from the
    config over a training list of steps x batch faces cycled from data_root's; loader_threads: its data.num_threads
    (default: the config's)."""
    name, overrides, batch = CASES[case]
    with tempfile.TemporaryDirectory() as out:
        root = data_root
        if data != "device-synthetic":
            root = os.path.join(out, "data")
            _subset_dataset(data_root, root, steps * batch)
            overrides = [*overrides, f"data.loader={data}", "data.balance=null"]
            if loader_threads is not None:
                overrides.append(f"data.num_threads={loader_threads}")
        cfg = load_config(name, [*overrides, f"data.root={root}", f"train.out_dir={out}", "train.epochs=1",
                                 f"train.batch_size={batch}", f"train.log_every={log_every}", "data.val_fraction=0",
                                 "model.init_mean_shape=false", "train.tensorboard=false", "train.progress=false",
                                 f"train.compile={str(compile_model).lower()}",
                                 f"train.device={device.type}"])
        loader = DeviceBatches(batch, cfg.data.image_size, 98, steps, device) if data == "device-synthetic" else None
        threads = None if data == "device-synthetic" else cfg.data.num_threads
        start = time.perf_counter()
        result = train(cfg, loader=loader)
        wall = time.perf_counter() - start
    return {"case": case, "data": data, "threads": threads, "batch": batch, "steps": steps, "log_every": log_every,
            "precision": cfg.train.precision if device.type == "cuda" else "fp32", "compile": compile_model,
            "images_per_s": result.images_per_s, "data_wait_share": result.data_wait_share, "wall_s": wall}


def step_breakdown(data_root: str, case: str, loader_backend: str, steps: int, device: torch.device,
                   fused_layers: bool = True) -> dict:
    """Median ms per phase of the L-GRN + relative-loss training step over `steps` steps (after 2 warm-up steps);
    fused_layers: the head's graph convolutions as one fused graph_conv op each (else matmuls + message passing)."""
    backbone, size, batch = BREAKDOWN_CASES[case]
    ds = open_dataset(data_root, fmt="wflw", split="train")
    loader = make_loader(ds, batch, train=True, device=device, image_size=size, backend=loader_backend,
                         num_threads=2, augment=AugmentConfig())
    model = build_model(ModelConfig(backbone=backbone), ds.scheme, size, fused_layers=fused_layers).to(device).train()
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
            pred, _ = model(b.images)
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
    return {"case": case, "loader": loader_backend, "head": "fused" if fused_layers else "unfused", "batch": batch,
            **{f"{k}_ms": v for k, v in ms.items()},
            "step_ms": total, "images_per_s": batch * 1e3 / total, "data_share": ms["data"] / total}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ddp_worker(out_json: str, overrides: list) -> None:
    """Run train() on the demo config (one process, or one rank under torchrun); rank 0 writes the result."""
    result = train(load_config("demo", overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as f:
            json.dump({"images_per_s": result.images_per_s, "steps": result.steps}, f)


def ddp_comparison(data_root: str, images: int, batch: int) -> list:
    """One epoch of the demo config on `images` training images, 1 process vs torchrun with 2 (same per-rank batch)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = os.path.join(tmp, "data")
        _subset_dataset(data_root, subset, images)
        overrides = [f"data.root={subset}", f"train.out_dir={tmp}", "train.epochs=1", f"train.batch_size={batch}",
                     "data.val_fraction=0.0", "data.loader=reference", "data.num_threads=1", "train.log_every=1000",
                     f"optim.base_batch_size={batch}", "train.tensorboard=false"]
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
    """A WFLW-layout list of `images` training faces: source's annotation lines in order, cycled when source has
    fewer (annotation lines only; images linked, cycle k through the link WFLW_images/c{k}, so that no line repeats
    another: open_dataset rejects duplicates)."""
    from structalign.data.wflw import annotation_path

    with open(annotation_path(source, "train")) as f:
        faces = [line.split() for line in f if line.strip()]
    images_dir = os.path.abspath(os.path.join(source, "WFLW_images"))
    os.makedirs(os.path.join(target, "WFLW_images"))
    for k in range(-(-images // len(faces))):
        os.symlink(images_dir, os.path.join(target, "WFLW_images", f"c{k}"))
    with open(os.path.join(target, "list_98pt_rect_attr_train.txt"), "w") as f:
        for i in range(images):
            *fields, image = faces[i % len(faces)]
            f.write(" ".join([*fields, f"c{i // len(faces)}/{image}"]) + "\n")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "synth-bench"),
                        help="built-in faces (rendered there if missing)")
    parser.add_argument("--case", choices=sorted(CASES), help="default: the paper's model on a GPU, the demo's on a "
                        "CPU, tiny with --dry-run")
    parser.add_argument("--steps", type=int, help="training steps of the loop/sync/loader runs (default 200 on a GPU, "
                        "12 on a CPU, 6 with --dry-run); breakdown: measured steps")
    parser.add_argument("--log-every", type=int, default=50, help="log interval of the loop runs (default 50)")
    parser.add_argument("--sections", default="loop,sync,breakdown,ddp,loader")
    parser.add_argument("--rounds", type=int, default=1, help="sync: alternated rounds of each setting (median)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true in the loop runs")
    parser.add_argument("--ddp-images", type=int, default=384)
    parser.add_argument("--loader-threads", type=int, help="loader: data.num_threads of the real loaders (default: "
                        "the case's config)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "train.json"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections - SECTIONS:
        parser.error(f"unknown sections {sorted(sections - SECTIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    gpu = device.type == "cuda"
    case = args.case or ("tiny" if args.dry_run else "paper r34 256px" if gpu else "demo r18/2 128px")
    steps = args.steps or (6 if args.dry_run else 200 if gpu else 12)
    log_every = min(args.log_every, max(1, steps // 3)) if args.dry_run else args.log_every
    scratch = tempfile.mkdtemp(prefix="structalign-bench-")
    try:
        data_root = os.path.join(scratch, "data") if args.dry_run and args.data == parser.get_default("data") \
            else args.data
        run_sections(args, sections, device, case, steps, log_every, data_root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_sections(args, sections: set, device: torch.device, case: str, steps: int, log_every: int,
                 data_root: str) -> None:
    gpu = device.type == "cuda"
    if not os.path.isdir(data_root):
        from structalign.data.synth import render_dataset

        print(f"rendering the built-in data into {data_root}", flush=True)
        render_dataset(data_root, 32 if args.dry_run else 512, 8 if args.dry_run else 64, seed=0)
    print(f"device: {device_name(device)}, torch {torch.__version__}; case {case}, {steps} steps", flush=True)
    rows = []
    if "loop" in sections:
        sources = ["device-synthetic"] + (["dali"] if gpu and dali_available() else [])
        loop = [run_loop(case, data_root, source, steps, log_every, device, args.compile) for source in sources]
        for row in loop:
            row["section"] = "loop"
            if gpu and case == "paper r34 256px":
                row["target_images_per_s"] = TARGET_IMAGES_PER_S
                row["meets_target"] = row["images_per_s"] >= TARGET_IMAGES_PER_S
        print(f"\ntraining loop, train() on {CASES[case][0]} ({'GPU defaults of the recipe' if gpu else 'CPU'}), "
              f"one epoch of {steps} steps; images/s after the first log interval"
              + ("" if gpu and dali_available() else "; DALI not installed or no GPU: synthetic batches only"))
        print_table(loop, ["case", "data", "batch", "steps", "precision", "compile", "images_per_s",
                           "data_wait_share", "wall_s"] + (["meets_target"] if gpu else []))
        rows += loop
    if "sync" in sections:
        runs = {1: [], log_every: []}
        for _ in range(args.rounds):  # alternated, so that a load change hits both settings alike
            for every, results in runs.items():
                results.append(run_loop(case, data_root, "device-synthetic", steps, every, device, args.compile))
        sync = []
        for every, results in runs.items():
            speeds = sorted(r["images_per_s"] for r in results)
            sync.append(dict(results[0], section="sync", rounds=args.rounds, images_per_s=speeds[len(speeds) // 2],
                             all_images_per_s=speeds))
        for row in sync:
            row["vs_read_every_step"] = row["images_per_s"] / sync[0]["images_per_s"]
        print(f"\nhost read of the losses every step (log_every=1) against every {log_every} steps, same run; median "
              f"of {args.rounds} alternated round(s)")
        print_table(sync, ["case", "data", "batch", "steps", "log_every", "rounds", "images_per_s",
                           "vs_read_every_step"])
        rows += sync
    if "breakdown" in sections and not args.dry_run:
        backends = ("reference", "dali") if dali_available() else ("reference",)
        breakdown = []
        for name in BREAKDOWN_CASES:
            for backend in backends:
                unfused, fused = (dict(step_breakdown(data_root, name, backend, steps, device, fused_layers=f),
                                       section="breakdown") for f in (False, True))
                fused["vs_unfused_head"] = unfused["step_ms"] / fused["step_ms"]
                breakdown += [unfused, fused]
        print("\ntraining step (L-GRN + relative-location loss, AdamW), median over", steps, "steps; head: graph "
              "convolutions fused (graph_conv) or not (matmuls + graph_message_passing)")
        print_table(breakdown, ["case", "loader", "head", "batch", "data_ms", "forward_ms", "backward_ms",
                                "optimiser_ms", "step_ms", "images_per_s", "data_share", "vs_unfused_head"])
        rows += breakdown
    if "ddp" in sections and not args.dry_run and (not gpu or torch.cuda.device_count() >= 2):
        ddp = [dict(row, section="ddp") for row in ddp_comparison(data_root, args.ddp_images, batch=16)]
        print("\nDDP: one epoch of the demo config, 1 process vs 2 (same batch per rank)")
        print_table(ddp, ["processes", "backend", "batch_per_rank", "steps", "images_per_s", "wall_s",
                          "vs_1_process"])
        rows += ddp
    if "loader" in sections:
        sources = ["device-synthetic", "reference"] + (["dali"] if dali_available() else [])
        fed = [dict(run_loop(case, data_root, source, steps, log_every, device, args.compile, args.loader_threads),
                    section="loader") for source in sources]
        for row in fed:
            row["vs_data_free"] = row["images_per_s"] / fed[0]["images_per_s"]
            if gpu and case == "paper r34 256px":
                row["meets_goal"] = row["images_per_s"] >= TARGET_IMAGES_PER_S and row["data_wait_share"] < 0.05
        where = "GPU" if gpu else "CPU: the loader shares the cores with the step"
        print(f"\nloader overlap, train() on {CASES[case][0]} ({where}), one epoch of {steps} steps fed by the real "
              f"loaders (decode + augment of the built-in faces) beside device-resident synthetic batches; "
              f"data_wait_share: share of the wall time in next(batches), after the first log interval"
              + ("" if dali_available() else "; DALI not installed"))
        print_table(fed, ["case", "data", "threads", "batch", "steps", "precision", "images_per_s", "data_wait_share",
                          "vs_data_free", "wall_s"] + (["meets_goal"] if gpu and case == "paper r34 256px" else []))
        rows += fed
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, rows, device, case=case, steps=steps, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
