"""Data pipeline throughput: DALI (CPU operators here, GPU operators when CUDA is present) against the reference
pipeline (numpy + PIL) inside a torch DataLoader with the same number of workers, measured side by side in one run.

    .venv/bin/python benchmarks/data.py [--images 128] [--size 256] [--threads 2] [--rounds 5] [--json out.json]

Input: full-size JPEGs (default 1024 x 768, one face each) rendered by structalign.data.synth, in two scenarios:
large faces (half face width 0.2-0.3 of the image height, box about 300-480 px) and WFLW-like faces (0.08-0.16,
box about 130-250 px). Output: S x S crops with every training augmentation on (affine, flip, occlusion, colour),
batch 32. Images/s of whole epochs through loader.epoch() to tensors on the device, after a warm-up epoch; the
pipelines alternate for `rounds` epochs and the median is reported (p20/p80 beside it).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import _quantile, device_name, print_table, write_json  # noqa: E402

from structalign.data import AugmentConfig, make_loader, open_dataset  # noqa: E402
from structalign.data.synth import render_dataset  # noqa: E402


def images_per_second(loader, epoch: int) -> float:
    """Throughput of one whole epoch through loader.epoch(), batches landed on the loader's device."""
    count, start = 0, time.perf_counter()
    for batch in loader.epoch(epoch):
        count += batch.images.shape[0]
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return count / (time.perf_counter() - start)


def measure_scenario(root: str, args, label: str) -> list:
    ds = open_dataset(root, fmt="wflw", split="train")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    loaders = []
    for device in devices:
        kw = dict(batch_size=args.batch_size, train=True, device=device, image_size=args.size,
                  num_threads=args.threads, augment=AugmentConfig(), seed=0)
        if device.type == "cpu":
            loaders.append(("DataLoader + numpy/PIL", device, make_loader(ds, backend="reference", **kw)))
        loaders.append(("DALI " + device.type.upper(), device, make_loader(ds, backend="dali", **kw)))
    for _, _, loader in loaders:  # warm-up: DALI buffers, page cache
        images_per_second(loader, 0)
    # The machine may be shared: rounds alternate the pipelines and the median of each is reported.
    rates = {name: [] for name, _, _ in loaders}
    for r in range(1, args.rounds + 1):
        for name, _, loader in loaders:
            rates[name].append(images_per_second(loader, r))
    base = statistics.median(rates[loaders[0][0]])
    rows = []
    for name, device, _ in loaders:
        rate = statistics.median(rates[name])
        rows.append({"device": device_name(device), "pipeline": name, "faces": label, "threads": args.threads,
                     "input": f"{args.width}x{args.height} JPEG", "output": f"{args.size}x{args.size}",
                     "images/s": rate, "p20": _quantile(rates[name], 0.2), "p80": _quantile(rates[name], 0.8),
                     "vs reference": rate / base})
    return rows


SCENARIOS = {"large": (0.2, 0.3), "wflw-like": (0.08, 0.16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images per epoch (and per scenario)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--data", help="folder for the rendered images, reused if present (default: temporary)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            root = os.path.join(args.data or tmp, f"{name}-{args.width}x{args.height}-{args.images}")
            if not os.path.isdir(os.path.join(root, "WFLW_images")):
                render_dataset(root, args.images, 0, width=args.width, height=args.height,
                               face_scale=SCENARIOS[name], workers=args.threads)
            rows += measure_scenario(root, args, f"{name} {SCENARIOS[name]}")
    print_table(rows, ["device", "pipeline", "faces", "threads", "input", "output", "images/s", "p20", "p80",
                       "vs reference"])
    if args.json:
        write_json(args.json, rows, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    main()
