"""Training and evaluation engine: everything meets here (data, models, losses, metrics).

    config.py       configs read from YAML/TOML (a base + overlays), `section.key=value` overrides (load_config)
    config_schema.py  the typed, frozen sections of a config on pydantic (Config, config_from_dict, ConfigError)
    train.py        the training loop, one process or DDP under torchrun (train -> TrainResult)
    runlog.py       the run folder's log: sync points, log.jsonl, TensorBoard, progress bar, throughput (RunLog)
    stop_signals.py Ctrl-C / SIGTERM: save at the next sync point, exit 130 / 75 (StopSignals, STOP_EXIT_CODES)
    evaluate.py     evaluation on all ranks with all-reduced per-image results (evaluate)
    report.py       a checkpoint's evaluation files: metrics, report, CSV, CED plot, overlays (evaluate_checkpoint)
    demo.py         the main job behind `structalign demo` (run_demo)
    checkpoint.py   TrainState (everything a run resumes from), model_args (the architecture a checkpoint rebuilds),
                    resume checks, atomic checkpoint files, weights_only loading
    optim.py        SGD / Adam / AdamW / LAMB, warm-up + multi-step / cosine schedule, linear / sqrt LR scaling
    finetune.py     model.init_from: a trained model's weights copied into a new run where they fit
    precision.py    autocast for fp32 / bf16 / fp16
    ema.py          exponential moving average of the weights
    distributed.py  process-group set-up from torchrun's environment, collectives with timeouts
"""
