"""Tiny, fast run configs for the engine tests (the data comes from the synth_root fixture in conftest.py)."""
from structalign.engine.config import config_from_dict


def tiny_raw_config(root: str, out_dir: str) -> dict:
    """Nested config dict: 24 training images (3 batches of 8), 8 for validation, a ResNet-18 of width 8 at 64 px."""
    return {
        "data": {"root": root, "format": "wflw", "val_fraction": 0.25, "image_size": 64, "loader": "reference",
                 "num_threads": 0, "augment": {}},
        "model": {"arch": "lgrn", "backbone": "resnet18", "backbone_width": 8, "head_width": 16, "num_blocks": 1},
        "loss": {"params": {"omega1": 0.5, "omega2": 5.0, "epsilon": 0.125}},
        "optim": {"name": "adamw", "lr": 2e-3, "base_batch_size": 8, "weight_decay": 1e-4, "schedule": "cosine",
                  "warmup_epochs": 0.5, "grad_clip": 5.0},
        "train": {"out_dir": out_dir, "epochs": 2, "batch_size": 8, "eval_every": 1, "eval_batch_size": 16,
                  "log_every": 1, "ema_decay": 0.9},
    }


def tiny_config(root: str, out_dir: str, **sections):
    raw = tiny_raw_config(root, out_dir)
    for name, changes in sections.items():
        raw[name].update(changes)
    return config_from_dict(raw)
