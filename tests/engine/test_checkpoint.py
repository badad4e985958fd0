"""Checkpoint files: round trip with the RNG state, atomic writes (mode from the umask, stale temporaries removed,
the directory fsynced after the rename), refusal of pickled code and files that are no checkpoint, and the
model_args that rebuild a model."""
import os

import pytest
import torch

from structalign.engine.checkpoint import (CheckpointError, build_from_args, load_checkpoint, model_args, rng_state,
                                           save_checkpoint, set_rng_state)
from structalign.engine.config_schema import RUN_SETTINGS, ModelConfig
from structalign.landmarks import COFW29
from structalign.models import build_model


def test_checkpoint_round_trip_with_rng(tmp_path):
    path = tmp_path / "ck.pt"
    torch.manual_seed(3)
    state = {"model": {"w": torch.arange(3.0)}, "model_args": {"arch": "fc"}, "config": {}, "rng": rng_state()}
    expected = torch.rand(2)
    save_checkpoint(str(path), state)
    loaded = load_checkpoint(str(path))
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(2), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"model": {}, "model_args": {}, "config": {}, "step": 1})
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"model": {}, "model_args": {}, "config": {}, "bad": lambda: 0})
    assert load_checkpoint(str(path))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_load_refuses_pickled_code_and_bad_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "model_args": {}, "config": {}}, evil)
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(evil))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"missing \['model', 'model_args', 'config'\]"):
        load_checkpoint(str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_checkpoint_mode_follows_the_umask_and_stale_temporaries_go(tmp_path):
    stale = tmp_path / ".tmp-abc123.pt"
    stale.write_bytes(b"x" * 100)  # a save killed before its rename
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "ck.pt"), {"model": {}, "model_args": {}, "config": {}})
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert (tmp_path / "ck.pt").stat().st_mode & 0o777 == 0o644


def test_checkpoint_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), os.path.isdir(f"/proc/self/fd/{fd}"),
                       os.path.exists(tmp_path / "ck.pt")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(str(tmp_path / "ck.pt"), {"model": {}, "model_args": {}, "config": {}})
    assert synced[-1] == (str(tmp_path.resolve()), True, True)  # the directory, after the rename


def test_model_args_are_the_configs_architecture_fields_and_rebuild_the_model():
    model_cfg = ModelConfig(backbone="resnet18", head_width=8, num_blocks=1, backbone_width=8, adjacency="dynamic",
                            op_backend="reference", backbone_weights="weights.pth", init_from="run/best.pt")
    args = model_args(model_cfg, COFW29, 64)
    assert set(args) == (set(ModelConfig.model_fields) - set(RUN_SETTINGS)) | {"scheme", "image_size"}
    assert args["adjacency"] == "dynamic" and args["scheme"] == COFW29.to_dict()
    rebuilt = build_from_args(args, op_backend="reference")
    built = build_model(model_cfg, COFW29, 64)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert rebuilt.scheme == COFW29 and rebuilt.image_size == 64
    with pytest.raises(CheckpointError, match="do not describe a model: .*head_width"):
        build_from_args({**args, "head_width": 0})
