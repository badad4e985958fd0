"""The `structalign data` subcommands.

    structalign data check ROOT [--format wflw|300w|cofw|coco|xml|list] [--scheme FILE] [--show 10] [--workers N]
                                [--face-box annotation] [--augment [--padding 1.25 ...] [--draws 2000]]
    structalign data scheme ROOT --format coco|xml|list --name NAME --out FILE.yaml [--split train] [--k 3]
    structalign data synth OUT [--num-train 1500] [--num-test 300] [--seed 0] [--width 320 --height 320]

`check` finds which formats ROOT holds and opens every split it finds with every record check of a training run
(structalign/data/records.py), skipping bad entries instead of stopping; then it decodes every image (in parallel,
with a progress bar). It prints, per split, the count of each kind of problem with `file:line` examples, and exits 1
when there is any. --augment also prints the share of training samples that lose a landmark out of the crop under
the default augmentation, for each crop padding given.

`scheme` reads a landmark set that has no scheme file yet and writes one to review (structalign/landmarks.py): flip
pairs matched on the mirrored mean shape, the paper's k-nearest-point graph, a guessed normaliser.
"""
import glob
import os
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from structalign.data.augment import CROP_PADDING, AugmentConfig, out_of_crop_rate
from structalign.data.datasets import ANY_COUNT_FORMATS, open_dataset
from structalign.data.records import ANY_COUNT, DatasetError, FaceDataset, Problem, Skipped
from structalign.data.reference_pipeline import read_rgb
from structalign.data.synth import FLAG_RATE, render_dataset
from structalign.data.wflw import ATTRIBUTES
from structalign.errors import InputError, MissingFileError
from structalign.landmarks import propose_scheme, scheme_from_dict, scheme_yaml


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


def _list_splits(root):
    def is_list(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(256).lstrip().startswith("[")

    return sorted(glob.glob(os.path.join(root, "*.csv")) + [p for p in glob.glob(os.path.join(root, "*.json"))
                                                            if is_list(p)])


DETECTORS = {"wflw": _wflw_splits, "300w": _300w_splits, "cofw": _cofw_splits, "coco": _coco_splits,
             "xml": _xml_splits, "list": _list_splits}


def decode_error(path: str):
    """None if the image at path decodes completely (as the reference pipeline decodes it), else a message naming
    the file and what went wrong."""
    try:
        read_rgb(path)
        return None
    except DatasetError as e:
        return str(e)


def decode_all(ds: FaceDataset, workers=None, label: str = "decoding") -> list:
    """Decode every image of ds (each file once) on `workers` threads with a progress bar; a Skipped
    (Problem.CORRUPT_IMAGE) for every record whose image does not decode."""
    paths = sorted({r.image_path for r in ds.records})
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        errors = dict(zip(paths, tqdm(pool.map(decode_error, paths), total=len(paths), desc=label, unit="img",
                                      disable=None, leave=False)))
    return [Skipped(r.source or r.image_path, r.line, errors[r.image_path], Problem.CORRUPT_IMAGE)
            for r in ds.records if errors[r.image_path] is not None]


def print_problems(skipped, show: int, out=print) -> int:
    """Print the count of each problem kind with up to `show` file:line examples; returns the number of problems
    (annotations the annotator marked ignore are listed, not counted)."""
    by_kind = {}
    for s in skipped:
        by_kind.setdefault(s.kind, []).append(s)
    for kind, items in by_kind.items():
        out(f"    {kind.value}: {len(items)}")
        for s in items[:show]:
            out(f"        {s}")
        if len(items) > show:
            out(f"        ... and {len(items) - show} more")
    return sum(len(items) for kind, items in by_kind.items() if kind is not Problem.IGNORED)


def check(root: str, fmt: str = None, show: int = 10, out=print, workers=None, decode: bool = True,
          face_box: str = "annotation", augment: bool = False, paddings=(CROP_PADDING,), draws: int = 2000,
          scheme=None) -> int:
    """Print what the dataset folder root holds and what is wrong with it; returns the number of problems (0 = clean).

    decode: decode every image (else only the checks training makes when it opens a dataset); augment: also print,
    for each crop padding, the share of augmented training samples with a landmark outside the crop; scheme: a
    scheme file for landmark sets other than the shipped three (as data.scheme).
    """
    if not os.path.isdir(root):
        raise MissingFileError(f"dataset folder {root!r} does not exist")
    formats = [fmt] if fmt else [f for f, detect in DETECTORS.items() if detect(root)]
    if not formats:
        out(f"{root}: no dataset found (looked for WFLW list_98pt_rect_attr_*.txt, 300W folders lfpw/helen/afw/ibug, "
            f"COFW_*_color.mat, COCO *_<split>.json, imglab *.xml, list *.csv / *.json)")
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
                ds = open_dataset(root, fmt=name, split=split, on_error="skip", face_box=face_box, scheme=scheme)
            except (DatasetError, OSError) as e:  # OSError: an annotation file that cannot be read
                out(f"{name} {label}: cannot open: {e}")
                problems += 1
                continue
            if name == "wflw" and split in ATTRIBUTES:  # subsets of test: its problems are already listed
                out(f"{name} test subset {label}: {len(ds)} faces")
                continue
            skipped = list(ds.skipped)
            if decode and len(ds):
                corrupt = decode_all(ds, workers, f"{name} {label}: decoding")
                skipped += corrupt
                bad = {s.where for s in corrupt}
                ds = FaceDataset([r for r in ds.records if r.where not in bad], ds.scheme, ds.name)
            count = sum(s.kind is not Problem.IGNORED for s in skipped)
            out(f"{name} {label}: {len(ds)} faces ({ds.scheme.name}), {count} problem{'s' * (count != 1)}"
                f"{'' if decode else ' (images not decoded)'}")
            problems += print_problems(skipped, show, out)
            if augment and len(ds):
                for padding in paddings:
                    samples, points = out_of_crop_rate(ds, AugmentConfig(), padding, draws=draws)
                    out(f"    crop padding {padding:g} ({face_box} box), default augmentation: {100 * samples:.1f} % "
                        f"of {max(draws, len(ds))} samples lose a landmark out of the crop ({100 * points:.2f} % "
                        f"of landmarks)")
    return problems


def _check(args) -> int:
    found = check(args.root, args.format, args.show, workers=args.workers, decode=not args.no_decode,
                  face_box=args.face_box, augment=args.augment, paddings=args.padding, draws=args.draws,
                  scheme=args.scheme)
    return 1 if found else 0


def write_proposed_scheme(root: str, fmt: str, name: str, out_path: str, split: str = "train", k: int = 3,
                          out=print) -> str:
    """Read split of the dataset at root (any point count), propose a scheme from its mean shape and write it to
    out_path (which must not exist) with what to review as comments; returns out_path."""
    if fmt not in ANY_COUNT_FORMATS:
        raise InputError(f"--format {fmt}: data scheme reads formats with any point count: {ANY_COUNT_FORMATS}")
    if os.path.exists(out_path):
        raise InputError(f"--out {out_path!r} exists; choose another path (nothing was written)")
    ds = open_dataset(root, fmt=fmt, split=split, scheme=ANY_COUNT)
    mean = ds.mean_shape()
    spec, notes = propose_scheme(name, mean, k)
    scheme = scheme_from_dict(spec, source=out_path, mean_shape=mean)
    header = (f"Proposed by `structalign data scheme` from the mean shape of {len(ds)} faces ({ds.name}).\n"
              f"Review before training:\n" + "\n".join(f"- {note}" for note in notes) +
              "\ngraph/relations: each point's k nearest points on the training mean shape, re-derived when a "
              "run opens its data\n(the paper's construction); write explicit edges / neighbors to fix them.")
    with open(out_path, "x") as f:
        f.write(scheme_yaml(spec, header))
    out(f"wrote {out_path}: {scheme.num_points} points, {len(spec['flip_pairs'])} flip pairs; review it, then train "
        f"with data.scheme={out_path}")
    for note in notes:
        out(f"  {note}")
    return out_path


def _scheme(args) -> int:
    write_proposed_scheme(args.root, args.format, args.name, args.out, args.split, args.k)
    return 0


def _synth(args) -> int:
    paths = render_dataset(args.out, args.num_train, args.num_test, seed=args.seed, width=args.width,
                           height=args.height, workers=args.workers, occlusion=args.occlusion)
    print(f"wrote {args.num_train} train and {args.num_test} test faces to {args.out} "
          f"({paths['train']}, {paths['test']}); open with --format wflw")
    return 0


def register(subparsers) -> None:
    """Add `data check ROOT`, `data scheme ROOT` and `data synth OUT` to the structalign command's subparsers."""
    data = subparsers.add_parser("data", help="inspect dataset folders, render the built-in data")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("check", help="check every annotation and decode every image; count problems per kind")
    p.add_argument("root")
    p.add_argument("--format", choices=sorted(DETECTORS), help="only this format (default: every one found)")
    p.add_argument("--show", type=int, default=10, help="examples listed per kind of problem (default 10)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--no-decode", action="store_true", help="only the checks training makes when opening data")
    p.add_argument("--face-box", default="annotation", choices=("annotation", "landmarks"),
                   help="face box the crop is built around, as data.face_box (default annotation)")
    p.add_argument("--augment", action="store_true",
                   help="also print the share of augmented samples that lose a landmark out of the crop")
    p.add_argument("--padding", type=float, nargs="+", default=[CROP_PADDING],
                   help=f"crop padding(s) for --augment, as data.crop_padding (default {CROP_PADDING})")
    p.add_argument("--draws", type=int, default=2000, help="augmented samples for --augment (at least one per face)")
    p.add_argument("--scheme", help="scheme file of a landmark set other than the shipped three (as data.scheme)")
    p.set_defaults(run=_check)
    p = sub.add_parser("scheme", help="propose a scheme file (flip pairs, graph, normaliser) for a new landmark set")
    p.add_argument("root")
    p.add_argument("--format", required=True, choices=ANY_COUNT_FORMATS)
    p.add_argument("--name", required=True, help="the scheme's name")
    p.add_argument("--out", required=True, help="scheme file to write (.yaml; must not exist)")
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=int, default=3, help="nearest points per landmark in the graph (default 3)")
    p.set_defaults(run=_scheme)
    p = sub.add_parser("synth", help="render the built-in face-like dataset in the WFLW layout")
    p.add_argument("out")
    p.add_argument("--num-train", type=int, default=1500)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--occlusion", type=float, default=FLAG_RATE,
                   help=f"probability of a face with occluders, 0..1 (default {FLAG_RATE}); each landmark's "
                        f"visibility label goes to a sidecar of the annotation file")
    p.set_defaults(run=_synth)
