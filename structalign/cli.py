"""The `structalign` command.

    structalign train CONFIG [section.key=value ...] [--resume CKPT]    (also under torchrun --nproc_per_node=N)
    structalign eval CKPT --data ROOT [--format wflw] [--split test] [--norm inter_ocular] [--out DIR]
    structalign predict CKPT IMAGE... [--boxes FILE] [--out DIR]
    structalign export CKPT model.onnx
    structalign demo [--data data/synth-demo] [--out runs/demo]
    structalign data check ROOT | data synth OUT
"""
import argparse
import json
import os
import sys

# What a user can get wrong (config, paths, files, values): reported as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def _train(args) -> int:
    from structalign.engine.config import load_config
    from structalign.engine.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result["best_nme"] is not None:
        print(f"best validation NME {result['best_nme']:.3f}% (epoch {result['best_epoch']}): "
              f"{result['best_checkpoint']}")
    return 130 if result["interrupted"] else 0


def _eval(args) -> int:
    from structalign.engine.report import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, args.data, fmt=args.format, split=args.split, out_dir=args.out,
                                 weights=args.weights, batch_size=args.batch_size, loader=args.loader,
                                 device=args.device, norm=args.norm)
    s = report["summary"]
    print(f"{args.split}: {s['images']} images  NME ({args.norm}) {s['nme']:.3f}%  FR@0.1 {s['fr']:.2f}%  AUC@0.1 {s['auc']:.4f}")
    for name, row in (report.get("subsets") or {}).items():
        print(f"  {name:<14} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, (int, float))))
    if args.out:
        print(f"report, CED plot and per-image errors in {args.out}")
    return 0


def read_boxes(path: str, count: int) -> list:
    """Face boxes from a text file: one line `x0 y0 x1 y1` per image, in the order the images were given."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--boxes: {path!r} does not exist")
    boxes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                box = [float(v) for v in fields]
            except ValueError:
                box = []
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"{path}, line {number}: expected `x0 y0 x1 y1` with x1 > x0 and y1 > y0, "
                                 f"got {line.strip()!r}")
            boxes.append(box)
    if len(boxes) != count:
        raise ValueError(f"{path}: {len(boxes)} boxes for {count} images (one line per image, in order)")
    return boxes


def _predict(args) -> int:
    from structalign.engine.report import draw_overlay
    from structalign.predictor import Predictor

    boxes = read_boxes(args.boxes, len(args.images)) if args.boxes else None
    predictor = Predictor(args.checkpoint, device=args.device, weights=args.weights)
    points = predictor.predict(args.images, boxes=boxes)
    os.makedirs(args.out, exist_ok=True)
    records = []
    for i, path in enumerate(args.images):
        box = boxes[i] if boxes else None
        stem = os.path.splitext(os.path.basename(path))[0]
        overlay = draw_overlay(path, points[i], os.path.join(args.out, f"{i:04d}_{stem}.png"), box=box)
        records.append({"image": path, "box": box, "landmarks": points[i].round(3).tolist(), "overlay": overlay})
    out_json = os.path.join(args.out, "landmarks.json")
    with open(out_json, "w") as f:
        json.dump({"scheme": predictor.scheme.name, "convention": "image pixels, pixel centres at integers",
                   "faces": records}, f)
    print(f"{len(records)} image(s): landmarks in {out_json}, overlays in {args.out}")
    return 0


def _export(args) -> int:
    from structalign.export import export_onnx

    print(f"wrote {export_onnx(args.checkpoint, args.output, weights=args.weights, opset=args.opset)}")
    return 0


def _demo(args) -> int:
    from structalign.engine.demo import run_demo

    run_demo(data_dir=args.data, out_dir=args.out, overrides=args.overrides, num_train=args.train_images,
             num_test=args.test_images)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structalign", description="Structure-coherent face alignment (L-GRN).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config (YAML/TOML file or a shipped config name)")
    p.add_argument("config", help="config file, or a shipped name: wflw_lgrn_r34, 300w_lgrn_r34, cofw_lgrn_r34, demo")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=0.02 train.epochs=10")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint (e.g. OUT_DIR/last.pt)")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="NME, FR, AUC, per-subset table, CED plot and per-image CSV of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="wflw", help="wflw | 300w | cofw | coco | xml (default wflw)")
    p.add_argument("--split", default="test", help="test (default), train or a subset name")
    p.add_argument("--out", help="directory for metrics.json, report.md, per_image.csv, ced.png and overlays")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader", default="reference", choices=("reference", "dali"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA weights where saved (default)")
    p.add_argument("--norm", default="inter_ocular", choices=("inter_ocular", "inter_pupil", "box"),
                   help="NME normaliser (default inter_ocular; COFW is usually reported inter_pupil)")
    p.set_defaults(run=_eval)

    p = sub.add_parser("predict", help="landmarks (JSON) and overlays (PNG) for images")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--boxes", metavar="FILE", help="face boxes, one line `x0 y0 x1 y1` per image in order; "
                   "WITHOUT IT THE WHOLE IMAGE IS TAKEN AS THE FACE BOX (fine for face crops, not for photos)")
    p.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.set_defaults(run=_predict)

    p = sub.add_parser("export", help="export a checkpoint's model to ONNX (dynamic batch)")
    p.add_argument("checkpoint")
    p.add_argument("output", help="path of the .onnx file")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--opset", type=int, default=18)
    p.set_defaults(run=_export)

    p = sub.add_parser("demo", help="render the built-in data, train on it for a few minutes, evaluate, report")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="changes to the demo config")
    p.add_argument("--data", default="data/synth-demo", help="built-in data directory (rendered if missing)")
    p.add_argument("--out", default="runs/demo", help="run directory (checkpoints, report, pictures)")
    p.add_argument("--train-images", type=int, default=1500)
    p.add_argument("--test-images", type=int, default=300)
    p.set_defaults(run=_demo)

    from structalign.data.commands import register

    register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as exc:
        print(f"structalign {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"structalign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
