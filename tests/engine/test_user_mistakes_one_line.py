"""Mistakes a user makes on the command line, each answered by one line that names the key or file at fault: a crop
too small for the backbone, a checkpoint that would run code, a batch larger than a shard, a 300W root that is not
one; and under DDP the closing "best validation NME" line is printed once, by rank 0."""
import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp

from structalign.cli import main
from process_group import as_rank, free_port

# The demo config, shrunk to a ResNet-18 of width 8 at 64 px for one epoch.
TINY = ["model.backbone_width=8", "model.head_width=16", "model.num_blocks=1", "data.image_size=64",
        "data.num_threads=0", "data.val_fraction=0.25", "train.epochs=1", "train.batch_size=4", "train.eval_every=1",
        "train.eval_batch_size=8", "train.progress=false", "train.tensorboard=false"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_image_size_below_the_backbone_stride_is_refused_by_the_config(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={out}", "data.image_size=4"]) == 1
    err = _one_line_error(capsys)
    assert "data.image_size: should be greater than or equal to 32, got 4" in err and not out.exists()


class _RunsShellCommand:
    """Pickles as a call of os.system: what a booby-trapped checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("echo booby-trapped",))


def test_booby_trapped_checkpoint_is_refused_in_one_line_naming_file_and_reason(synth_root, tmp_path, capsys):
    trapped = tmp_path / "trapped.pt"
    torch.save({"model": _RunsShellCommand(), "model_args": {}, "config": {}}, trapped)
    assert main(["eval", str(trapped), "--data", synth_root]) == 1
    err = _one_line_error(capsys)
    assert f"checkpoint '{trapped}' cannot be read: refused, as loading it would import {os.system.__module__}." \
           f"system" in err
    assert "weights_only" not in err and "will likely succeed" not in err


def test_batch_larger_than_a_shard_names_train_batch_size(synth_root, tmp_path, capsys):
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={tmp_path / 'run'}", *TINY,
                 "train.batch_size=200"]) == 1
    err = _one_line_error(capsys)
    assert "not one batch of 200 with drop_last: train.batch_size (per process) must be at most 24" in err


def test_300w_format_on_a_root_without_its_folders_names_data_root_and_format(synth_root, tmp_path, capsys):
    # synth_root is a WFLW root: the mistake is data.format (or data.root).
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={tmp_path / 'run'}", *TINY,
                 "data.format=300w"]) == 1
    err = _one_line_error(capsys)
    assert "300W folder 'lfpw/trainset' of split 'train' not found under" in err
    assert "data.root" in err and "data.format" in err


def _train_rank(rank: int, world: int, port: int, root: str, out: str):
    """One rank of `torchrun --nproc_per_node=2 -m structalign.cli train demo ...`, its stdout in out/rankN.txt."""
    as_rank(rank, world, port)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as log, contextlib.redirect_stdout(log):
        code = main(["train", "demo", f"data.root={root}", f"train.out_dir={os.path.join(out, 'run')}", *TINY])
    if code != 0:
        raise SystemExit(code)


@pytest.mark.slow  # two processes train one epoch: ~25 s on 2 shared cores
def test_only_rank_0_prints_the_best_validation_line_under_ddp(synth_root, tmp_path):
    mp.spawn(_train_rank, args=(2, free_port(), synth_root, str(tmp_path)), nprocs=2, join=True)
    best = os.path.join(tmp_path, "run", "best.pt")
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.count("best validation NME") == 1 and f"(epoch 0): {best}" in rank0
    assert "best validation NME" not in rank1
