"""The main job: render the built-in data if missing, train the demo config, evaluate on the held-out test split,
write the report (JSON + Markdown), overlays and the CED plot under the run directory, print the held-out NME.

    structalign demo                 (make demo)
"""
import json
import os
import time

from structalign.engine.config import load_config
from structalign.engine.report import evaluate_checkpoint, occlusion_lines
from structalign.engine.train import train


def ensure_synthetic_data(data_dir: str, num_train: int, num_test: int) -> bool:
    """Render the built-in data into data_dir unless it is already there with its visibility labels (data rendered
    before they existed is rendered again); True when it was rendered now."""
    from structalign.data import DatasetError
    from structalign.data.synth import render_dataset
    from structalign.data.wflw import annotation_path, visibility_path

    try:
        if all(os.path.isfile(visibility_path(annotation_path(data_dir, split))) for split in ("train", "test")):
            return False
    except DatasetError:
        pass
    render_dataset(data_dir, num_train, num_test, seed=0)
    return True


def run_demo(data_dir: str = "data/synth-demo", out_dir: str = "runs/demo", overrides=(), num_train: int = 1500,
             num_test: int = 300) -> dict:
    """Returns the report dict also written to out_dir/report.json."""
    start = time.perf_counter()
    cfg = load_config("demo", [f"data.root={data_dir}", f"train.out_dir={out_dir}", *overrides], check_data=False)
    rendered = ensure_synthetic_data(data_dir, num_train, num_test)
    render_s = time.perf_counter() - start
    print(f"demo: data in {data_dir} ({'rendered in %.0f s' % render_s if rendered else 'already there'})",
          flush=True)
    result = train(cfg)
    train_s = time.perf_counter() - start - render_s
    checkpoint = result.best_checkpoint or result.last_checkpoint
    test = evaluate_checkpoint(checkpoint, data_dir, fmt=cfg.data.format, split=cfg.data.test_split,
                               out_dir=os.path.join(out_dir, "test"), batch_size=cfg.train.eval_batch_size,
                               loader=cfg.data.loader, device=cfg.train.device)
    total_s = time.perf_counter() - start
    s = test["summary"]
    report = {"data": data_dir, "checkpoint": checkpoint, "config": cfg.to_dict(), "train_steps": result.steps,
              "train_images_per_s": result.images_per_s, "best_val_nme": result.best_nme,
              "test": test["summary"], "subsets": test["subsets"], "overlays": test["overlays"],
              "ced": os.path.join(out_dir, "test", "ced.png"),
              "seconds": {"render": round(render_s, 1), "train": round(train_s, 1), "total": round(total_s, 1)}}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    m = cfg.model
    lines = ["# structalign demo", "",
             f"{m.arch} ({m.backbone}, {cfg.data.image_size} px) trained {result.steps} steps on {data_dir} "
             f"in {train_s:.0f} s ({result.images_per_s or 0:.1f} img/s); whole demo {total_s:.0f} s.", "",
             "| held-out test | NME % | FR@0.1 % | AUC@0.1 |", "|---|---|---|---|",
             f"| {s['images']} images | {s['nme']:.3f} | {s['fr']:.2f} | {s['auc']:.4f} |", "",
             *occlusion_lines(s),
             "Inter-ocular NME (outer eye corners); FR and AUC at 0.1. Details, CED and overlays: "
             "[test/report.md](test/report.md).", "", "![CED](test/ced.png)", ""]
    lines += [f"![overlay]({os.path.relpath(p, out_dir)})" for p in test["overlays"][:4]]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"demo: held-out test NME {s['nme']:.3f}% (FR@0.1 {s['fr']:.2f}%, AUC@0.1 {s['auc']:.4f}) on "
          f"{s['images']} images; report {os.path.join(out_dir, 'report.md')}; {total_s:.0f} s in total", flush=True)
    return report
