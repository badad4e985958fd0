"""Data pipeline throughput: DALI (CPU operators here, GPU operators when CUDA is present) against the reference
pipeline (numpy + PIL) inside a torch DataLoader with the same number of workers, measured side by side in one run.

    .venv/bin/python benchmarks/data.py [--images 128] [--size 256] [--threads 2] [--epochs 3] [--json out.json]

Input: full-size JPEGs (default 1024 x 768, one face each) rendered by structalign.data.synth; output: S x S crops
with every training augmentation on (affine, flip, occlusion, colour), batch 32. Images/s counts whole epochs after
one warm-up epoch, through loader.epoch() to tensors on the device.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.data import AugmentConfig, make_loader, open_dataset  # noqa: E402
from structalign.data.synth import render_dataset  # noqa: E402


def images_per_second(loader, epochs: int) -> float:
    for _ in loader.epoch(0):  # warm-up: worker start, DALI buffers, page cache
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in loader.epoch(epoch):
            count += batch.images.shape[0]
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", help="reuse a rendered folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or tmp
        if not os.path.isdir(os.path.join(root, "WFLW_images")):
            render_dataset(root, args.images, 0, width=args.width, height=args.height, workers=args.threads)
        ds = open_dataset(root, fmt="wflw", split="train")
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        rows = []
        for device in devices:
            kw = dict(batch_size=args.batch_size, train=True, device=device, image_size=args.size,
                      num_threads=args.threads, augment=AugmentConfig(), seed=0)
            providers = [("reference", "DataLoader + numpy/PIL")] if device.type == "cpu" else []
            providers.append(("dali", "DALI " + ("GPU" if device.type == "cuda" else "CPU")))
            base = None
            for backend, label in providers:
                rate = images_per_second(make_loader(ds, backend=backend, **kw), args.epochs)
                base = base or rate
                rows.append({"device": device_name(device), "pipeline": label, "threads": args.threads,
                             "input": f"{args.width}x{args.height} JPEG", "output": f"{args.size}x{args.size}",
                             "images/s": rate, "vs reference": rate / base})
        print_table(rows, ["device", "pipeline", "threads", "input", "output", "images/s", "vs reference"])
        if args.json:
            write_json(args.json, rows, devices[-1])


if __name__ == "__main__":
    main()
