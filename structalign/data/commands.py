"""The `structalign data` subcommands.

    structalign data check ROOT [--format wflw|300w|cofw|coco|xml] [--show 10]
    structalign data synth OUT [--num-train 1500] [--num-test 300] [--seed 0] [--width 320 --height 320]

`check` finds which formats ROOT holds, opens every split it finds (skipping bad entries instead of stopping) and
prints counts per split and subset, missing images and malformed annotations; it exits 1 when something is wrong.
"""
import glob
import os

from structalign.data.datasets import open_dataset
from structalign.data.records import DatasetError
from structalign.data.wflw import ATTRIBUTES


def _wflw_splits(root):
    from structalign.data.wflw import annotation_path

    found = []
    for split in ("train", "test"):
        try:
            annotation_path(root, split)
            found.append(split)
        except DatasetError:
            pass
    return found + (list(ATTRIBUTES) if "test" in found else [])


def _300w_splits(root):
    from structalign.data.ibug300w import SPLIT_FOLDERS

    return [s for s in ("train", "common", "challenging")
            if any(os.path.isdir(os.path.join(root, f)) for f in SPLIT_FOLDERS[s])]


def _cofw_splits(root):
    from structalign.data.cofw import FILES

    return [s for s, (name, *_) in FILES.items() if os.path.isfile(os.path.join(root, name))]


def _coco_splits(root):
    files = glob.glob(os.path.join(root, "annotations", "*_*.json")) + glob.glob(os.path.join(root, "*_*.json"))
    return sorted(files)


def _xml_splits(root):
    return sorted(glob.glob(os.path.join(root, "*.xml")))


DETECTORS = {"wflw": _wflw_splits, "300w": _300w_splits, "cofw": _cofw_splits, "coco": _coco_splits,
             "xml": _xml_splits}


def check(root: str, fmt: str = None, show: int = 10, out=print) -> int:
    """Print what the dataset folder root holds; returns the number of problems found (0 = clean)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    formats = [fmt] if fmt else [f for f, detect in DETECTORS.items() if detect(root)]
    if not formats:
        out(f"{root}: no dataset found (looked for WFLW list_98pt_rect_attr_*.txt, 300W folders lfpw/helen/afw/ibug, "
            f"COFW_*_color.mat, COCO *_<split>.json, imglab *.xml)")
        return 1
    problems = 0
    for name in formats:
        splits = DETECTORS[name](root)
        if not splits:
            out(f"{root}: no {name} split found")
            problems += 1
        for split in splits:
            label = os.path.basename(split) if os.path.isfile(split) else split
            try:
                ds = open_dataset(root, fmt=name, split=split, on_error="skip")
            except (DatasetError, ValueError, OSError) as e:
                out(f"{name} {label}: cannot open: {e}")
                problems += 1
                continue
            if name == "wflw" and split in ATTRIBUTES:  # subsets of test: its problems are already listed
                out(f"{name} test subset {label}: {len(ds)} faces")
                continue
            missing = [s for s in ds.skipped if s.reason.startswith("image not found")]
            bad = [s for s in ds.skipped if s not in missing]
            out(f"{name} {label}: {len(ds)} faces ({ds.scheme.name}), {len(missing)} missing images, "
                f"{len(bad)} bad annotations")
            for s in ds.skipped[:show]:
                out(f"    {s}")
            if len(ds.skipped) > show:
                out(f"    ... and {len(ds.skipped) - show} more")
            problems += len(ds.skipped)
    return problems


def _check(args) -> int:
    return 1 if check(args.root, args.format, args.show) else 0


def _synth(args) -> int:
    from structalign.data.synth import render_dataset

    paths = render_dataset(args.out, args.num_train, args.num_test, seed=args.seed, width=args.width,
                           height=args.height, workers=args.workers)
    print(f"wrote {args.num_train} train and {args.num_test} test faces to {args.out} "
          f"({paths['train']}, {paths['test']}); open with --format wflw")
    return 0


def register(subparsers) -> None:
    """Add `data check ROOT` and `data synth OUT` to the structalign command's subparsers."""
    data = subparsers.add_parser("data", help="inspect dataset folders, render the built-in data")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("check", help="print counts per split and subset, missing images, bad annotations")
    p.add_argument("root")
    p.add_argument("--format", choices=sorted(DETECTORS), help="only this format (default: every one found)")
    p.add_argument("--show", type=int, default=10, help="problems listed per split (default 10)")
    p.set_defaults(run=_check)
    p = sub.add_parser("synth", help="render the built-in face-like dataset in the WFLW layout")
    p.add_argument("out")
    p.add_argument("--num-train", type=int, default=1500)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(run=_synth)
