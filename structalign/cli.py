"""The `structalign` command.

    structalign train CONFIG [section.key=value ...] [--resume CKPT|auto]    (also under torchrun --nproc_per_node=N)
    structalign eval CKPT --data ROOT [--format wflw] [--split test] [--norm inter_ocular] [--out DIR]
    structalign predict CKPT|MODEL.onnx IMAGE|FOLDER|VIDEO... [--out DIR|OUT.mp4] [--boxes FILE] [--flip-test]
    structalign export CKPT model.onnx [--input crops]
    structalign demo [--data data/synth-demo] [--out runs/demo]
    structalign data check ROOT | data scheme ROOT --format list --name NAME --out FILE.yaml | data synth OUT
"""
import argparse
import os
import sys

from structalign import torch_requirement_error
from structalign.errors import StructalignError

# What a user can get wrong (config, paths, files, values, a run that diverged): the project's own error types,
# reported as one line. Every other exception is a bug and keeps its traceback.
USER_ERRORS = (StructalignError,)


def _train(args) -> int:
    from structalign.engine.config import load_config
    from structalign.engine.stop_signals import STOP_EXIT_CODES
    from structalign.engine.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)  # "auto": train.out_dir/last.pt as rank 0 finds it, else a new run
    if result.best_nme is not None and result.is_main:
        print(f"best validation NME {result.best_nme:.3f}% (epoch {result.best_epoch}): {result.best_checkpoint}")
    return STOP_EXIT_CODES[result.interrupted] if result.interrupted else 0


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}%"


def _eval(args) -> int:
    from structalign.engine.report import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, args.data, fmt=args.format, split=args.split, out_dir=args.out,
                                 weights=args.weights, batch_size=args.batch_size, loader=args.loader,
                                 device=args.device, norm=args.norm)
    s = report["summary"]
    print(f"{args.split}: {s['images']} images  NME ({args.norm}) {s['nme']:.3f}%  FR@0.1 {s['fr']:.2f}%  AUC@0.1 {s['auc']:.4f}")
    if s["heavy_occlusion"] is not None:
        auroc = s["visibility_auroc"]
        print(f"  occluded points NME {_pct(s['nme_occluded'])}  visible points NME {_pct(s['nme_visible'])}  "
              f"{s['heavy_occlusion']['count']} faces >= 20 % occluded: NME {_pct(s['heavy_occlusion']['nme'])} "
              f"FR@0.1 {_pct(s['heavy_occlusion']['fr'])}  visibility AUROC {'-' if auroc is None else f'{auroc:.3f}'}")
    for name, row in (report.get("subsets") or {}).items():
        print(f"  {name:<14} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, (int, float))))
    if args.out:
        print(f"report, CED plot and per-image errors in {args.out}")
    return 0


def _predict(args) -> int:
    from structalign.inference.batch import predict_files
    from structalign.inference.detector import BoxCalibration, YuNetFaceDetector

    detector = None if args.detector == "none" else YuNetFaceDetector(threads=args.threads)
    options = dict(detector=detector, flip_test=args.flip_test,
                   batch_size=args.batch_size,
                   calibration=BoxCalibration(*args.box_calibration) if args.box_calibration else None)
    if args.model.endswith(".onnx"):
        from structalign.inference.onnx_predictor import OnnxPredictor

        predictor = OnnxPredictor(args.model, threads=args.threads, **options)
    else:
        from structalign.inference.predictor import Predictor

        predictor = Predictor(args.model, device=args.device, weights=args.weights, **options)
    video_filter = dict(min_cutoff=args.filter_min_cutoff, beta=args.filter_beta, d_cutoff=args.filter_d_cutoff)
    report = predict_files(predictor, args.inputs, args.out, boxes_file=args.boxes, overlays=not args.no_overlays,
                           video_filter=video_filter, detect_every=args.detect_every)
    print(f"{report.images} image(s) or frame(s), {report.faces} face(s); wrote "
          + (", ".join(report.written) or "nothing"))
    if report.without_faces:  # a result, not a failure: listed, and the exit status stays 0
        print(f"no face found in {len(report.without_faces)} image(s): " + ", ".join(report.without_faces))
    if report.failures:
        print(f"{len(report.failures)} input(s) skipped:", file=sys.stderr)
        for message in report.failures:
            print(f"  {message}", file=sys.stderr)
    return 1 if report.failures else 0


def _export(args) -> int:
    from structalign.export import export_onnx

    written = export_onnx(args.checkpoint, args.output, weights=args.weights, opset=args.opset,
                          input_kind=args.input)
    sizes = ", ".join(f"{path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)" for path in written)
    kind = "one self-contained file" if len(written) == 1 else "graph + external weights (over 2 GB)"
    graph_input = "uint8 RGB crops [B, S, S, 3]" if args.input == "crops" else "normalised float32 [B, 3, S, S]"
    print(f"wrote {sizes}: {kind}; input {graph_input}, output landmarks [B, N, 2] in crop pixels")
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
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint (e.g. OUT_DIR/last.pt); "
                   "auto: from train.out_dir/last.pt where it exists, else start the run")
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

    p = sub.add_parser("predict", help="landmarks (JSON, CSV) and overlays for images, folders and videos")
    p.add_argument("model", help="a checkpoint (.pt) or an exported graph (.onnx, run in ONNX Runtime)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) and videos")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions); for one video, "
                   "may be the overlay video's path (out.mp4, with out.json and out.csv beside it)")
    p.add_argument("--boxes", metavar="FILE", help="face boxes instead of detection: one line per image (folders "
                   "expanded in sorted order), `x0 y0 x1 y1` per face")
    p.add_argument("--detector", default="yunet", choices=("yunet", "none"),
                   help="face detector (default: YuNet, a CNN); none = the whole image is the face box")
    p.add_argument("--box-calibration", nargs=3, type=float, metavar=("SCALE", "SHIFT_X", "SHIFT_Y"),
                   help="detector box -> training face box (default: measured for the landmark-box convention; "
                   "see benchmarks/detector_calibration.py)")
    p.add_argument("--flip-test", action="store_true", help="average with the prediction on the mirrored crop")
    p.add_argument("--no-overlays", action="store_true", help="write no overlay pictures for images")
    p.add_argument("--batch-size", type=int, default=32, help="faces per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads of the face detector and of an "
                   ".onnx model (0 = its default)")
    p.add_argument("--filter-min-cutoff", type=float, default=1.0, help="video: One-Euro cutoff at rest, Hz "
                   "(lower = smoother)")
    p.add_argument("--filter-beta", type=float, default=0.05, help="video: One-Euro speed coefficient (higher = "
                   "less lag)")
    p.add_argument("--filter-d-cutoff", type=float, default=1.0, help="video: One-Euro speed cutoff, Hz")
    p.add_argument("--detect-every", type=int, default=5, metavar="K", help="video: detect faces on every K-th "
                   "frame, follow them from their landmarks in between (default 5; 1 = detect on every frame)")
    p.set_defaults(run=_predict)

    p = sub.add_parser("export", help="export a checkpoint's model to ONNX (dynamic batch, one self-contained file)")
    p.add_argument("checkpoint")
    p.add_argument("output", help="path of the .onnx file")
    p.add_argument("--input", default="normalised", choices=("normalised", "crops"),
                   help="graph input: normalised float32 [B, 3, S, S] (default) or uint8 RGB crops [B, S, S, 3] "
                   "with the normalisation in the graph")
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
    problem = torch_requirement_error()  # the commands (their parsers included) need torch
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
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
