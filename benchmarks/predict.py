"""Inference benchmark on the CPU: per-face latency and throughput of detection, crop and model for torch eager,
torch.compile and ONNX Runtime, with 1 and 2 threads, for the paper's model (ResNet-34 L-GRN at 256 px) and the
demo's small one (half-width ResNet-18 at 128 px), end to end on a photo and per video frame, beside dlib's 68-point
shape predictor where it is installed.

    flock /tmp/structalign-cpu.lock .venv/bin/python benchmarks/predict.py [--reps 20] [--no-compile]

The picture: scikit-image's `astronaut` (its top 512 x 384, one face) enlarged to 640 x 480. Models are untrained
(same cost as trained ones). "detect": the built-in YuNet detector on the picture (with as many threads as the row);
"crop": one face's crop; "model b1": one face per forward; "model b8": eight faces per forward, per face; "end to
end": predict_image on the picture (detect, crop, model, map back), per face ("Haar cascade": with OpenCV's cascade,
benchmarks/detect.py, as the detector instead); "video, detect every K": ms per frame of predict_video on a 640 x 480
clip of the face moving (60 frames: decode, detection on every K-th frame and the face followed from its landmarks in
between, model, tracks, One-Euro filter; no overlay video written). dlib:
`dlib.shape_predictor` on the detected box (its model file from the face_recognition_models package, or the path in
$DLIB_SHAPE_PREDICTOR); its detector is not timed (ours is, on the same picture). "cpu ms/face": this process's CPU
time (all threads), the cost of a one-thread row without the waits that other processes' load adds.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detect import HaarCascade  # noqa: E402
from harness import measure, print_table, write_json  # noqa: E402

from structalign.engine.checkpoint import model_args  # noqa: E402
from structalign.engine.config_schema import ModelConfig  # noqa: E402
from structalign.export import export_onnx  # noqa: E402
from structalign.inference.crop import crop_image, crop_matrix  # noqa: E402
from structalign.inference.detector import YuNetFaceDetector  # noqa: E402
from structalign.inference.onnx_predictor import OnnxPredictor  # noqa: E402
from structalign.inference.predictor import Predictor  # noqa: E402
from structalign.inference.video import predict_video  # noqa: E402
from structalign.landmarks import WFLW98  # noqa: E402
from structalign.models import build_model  # noqa: E402

MODELS = {  # name: ModelConfig fields and image_size (configs wflw_lgrn_r34.yaml and demo.yaml)
    "paper r34 256px": dict(arch="lgrn", backbone="resnet34", image_size=256, head_width=128, num_blocks=4),
    "demo r18/2 128px": dict(arch="lgrn", backbone="resnet18", image_size=128, head_width=64, num_blocks=2,
                             backbone_width=32),
}
BATCH = 8
VIDEO_FRAMES, DETECT_EVERY = 60, (1, 5, 10)


def write_clip(path: str, picture: np.ndarray) -> str:
    """A 640 x 480 mp4 of picture's face moving: VIDEO_FRAMES frames panning right and zooming in (OpenCV)."""
    import cv2

    height, width = picture.shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
    for t in range(VIDEO_FRAMES):
        zoom, shift = 1 + 0.004 * t, 2.0 * t
        matrix = np.array([[zoom, 0, shift - (zoom - 1) * width / 2], [0, zoom, -(zoom - 1) * height / 2]])
        writer.write(cv2.cvtColor(cv2.warpAffine(picture, matrix, (width, height)), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def make_checkpoint(folder: str, name: str, args: dict) -> str:
    path = os.path.join(folder, name.split()[0] + ".pt")
    model_cfg, size = ModelConfig(**{k: v for k, v in args.items() if k != "image_size"}), args["image_size"]
    model = build_model(model_cfg, WFLW98, size)
    torch.save({"model": model.state_dict(), "ema": None, "model_args": model_args(model_cfg, WFLW98, size),
                "config": {"data": {"image_size": size}, "train": {"precision": "fp32"}}}, path)
    return path


def dlib_shape_predictor():
    """(dlib module, shape predictor) or (None, why not)."""
    try:
        import dlib
    except ImportError:
        return None, "dlib not installed"
    path = os.environ.get("DLIB_SHAPE_PREDICTOR")
    if path is None:
        try:
            import face_recognition_models

            path = face_recognition_models.pose_predictor_model_location()
        except ImportError:
            return None, "no 68-point model file (pip install face_recognition_models, or $DLIB_SHAPE_PREDICTOR)"
    return dlib, dlib.shape_predictor(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                        help=f"models to run (default all: {', '.join(map(repr, MODELS))})")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from skimage import data

    import cv2

    picture = np.ascontiguousarray(cv2.resize(data.astronaut()[:384], (640, 480), interpolation=cv2.INTER_CUBIC))
    device = torch.device("cpu")
    rows = []

    def row(model, runtime, threads, stage, ms, faces=1):
        rows.append({"model": model, "runtime": runtime, "threads": threads, "stage": stage,
                     "ms/face": round(ms["median_ms"] / faces, 3), "p20": round(ms["p20_ms"] / faces, 3),
                     "p80": round(ms["p80_ms"] / faces, 3), "cpu ms/face": round(ms["cpu_ms"] / faces, 3),
                     "faces/s": round(1e3 * faces / ms["median_ms"], 1)})

    with tempfile.TemporaryDirectory() as folder:
        clip = write_clip(os.path.join(folder, "clip.mp4"), picture)
        for name in args.models:
            model_args = MODELS[name]
            checkpoint = make_checkpoint(folder, name, model_args)
            onnx_path = export_onnx(checkpoint, os.path.join(folder, "m.onnx"), input_kind="crops")[0]
            eager = Predictor(checkpoint, device="cpu")
            size = eager.image_size
            box = eager.calibration(eager.detector(picture)[0])[0]
            crops = np.stack([crop_image(picture, crop_matrix(box, size, eager.padding), size)] * BATCH)
            runtimes = {"torch eager": eager}
            if not args.no_compile:
                # Each model gets its own recompile budget (both share the forward's code object); the compiles,
                # one per batch size and thread count, happen in measure()'s warm-up calls.
                torch._dynamo.reset()
                compiled = Predictor(checkpoint, device="cpu")
                compiled.model = torch.compile(compiled.model)
                runtimes["torch.compile"] = compiled
            for threads in (1, 2):
                torch.set_num_threads(threads)
                cv2.setNumThreads(threads)
                detector = YuNetFaceDetector(threads=threads)
                runtimes["onnxruntime"] = OnnxPredictor(onnx_path, threads=threads, detector=detector)
                for predictor in runtimes.values():
                    predictor.detector = detector
                row(name, "onnxruntime", threads, "detect", measure(lambda: detector(picture), device,
                                                                    reps=args.reps))
                row(name, "PIL", threads, "crop", measure(
                    lambda: crop_image(picture, crop_matrix(box, size, eager.padding), size), device, reps=args.reps))
                for runtime, predictor in runtimes.items():
                    row(name, runtime, threads, "model b1", measure(lambda: predictor._forward(crops[:1]), device,
                                                                    reps=args.reps))
                    row(name, runtime, threads, f"model b{BATCH}", measure(lambda: predictor._forward(crops), device,
                                                                           reps=args.reps), BATCH)
                    row(name, runtime, threads, "end to end", measure(lambda: predictor.predict_image(picture),
                                                                      device, reps=args.reps))
                haar = OnnxPredictor(onnx_path, threads=threads, detector=HaarCascade())
                row(name, "onnxruntime", threads, "end to end, Haar cascade", measure(
                    lambda: haar.predict_image(picture), device, reps=args.reps))
                for every in DETECT_EVERY:
                    video = OnnxPredictor(onnx_path, threads=threads, detector=detector)
                    row(name, "onnxruntime", threads, f"video, detect every {every}", measure(
                        lambda: predict_video(video, clip, detect_every=every), device, warmup=1,
                        reps=max(3, args.reps // 4)), VIDEO_FRAMES)
        dlib, shape_predictor = dlib_shape_predictor()
        if dlib is None:
            print(f"dlib 68-point shape predictor: {shape_predictor}")
        else:
            x0, y0, x1, y1 = (int(round(v)) for v in eager.detector(picture)[0][0])
            rect = dlib.rectangle(x0, y0, x1, y1)
            for threads in (1, 2):
                row("dlib 68-point", "dlib", threads, "model b1", measure(lambda: shape_predictor(picture, rect),
                                                                          device, reps=args.reps))
    print_table(rows, ["model", "runtime", "threads", "stage", "ms/face", "p20", "p80", "cpu ms/face", "faces/s"])
    if args.json:
        write_json(args.json, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
