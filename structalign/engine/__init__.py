"""Training and evaluation engine: everything meets here (data, models, losses, metrics).

    config.py       configs read from YAML/TOML (a base + overlays), `section.key=value` overrides (load_config)
    config_schema.py  the typed, frozen sections of a config on pydantic (Config, config_from_dict, ConfigError)
    train.py        the training loop, one process or DDP under torchrun (train)
    evaluate.py     evaluation on all ranks with all-reduced per-image results (evaluate)
    report.py       a checkpoint's evaluation files: metrics, report, CSV, CED plot, overlays (evaluate_checkpoint)
    demo.py         the main job behind `structalign demo` (run_demo)
    checkpoint.py   TrainState (everything a run resumes from), atomic checkpoint files, weights_only loading
    optim.py        SGD / Adam / AdamW / LAMB, warm-up + multi-step / cosine schedule, linear LR scaling
    ema.py          exponential moving average of the weights
    distributed.py  process-group set-up from torchrun's environment
"""
