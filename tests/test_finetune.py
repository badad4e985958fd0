"""Fine-tuning (`model.init_from`): a trained model's weights copied into a new run's model where they fit."""
import pytest
import torch

from structalign.engine.checkpoint import save_checkpoint
from structalign.engine.finetune import init_from_checkpoint
from structalign.landmarks import WFLW98

from model_helpers import make_model

TINY = dict(arch="lgrn", backbone="resnet18", image_size=64, head_width=16, num_blocks=1, backbone_width=8,
            op_backend="reference")


def _trained(scheme, seed: int):
    """A model with every entry moved away from its initialisation, as a trained one would be."""
    torch.manual_seed(seed)
    model = make_model(scheme=scheme, **TINY)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
    return model


def _checkpoint(tmp_path, model, scheme, ema=None) -> str:
    path = str(tmp_path / "source.pt")
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema, "config": {},
                           "model_args": dict(TINY, scheme=scheme)})
    return path


def test_same_scheme_transfers_everything_and_prefers_ema(tmp_path):
    source, averaged = _trained("wflw98", 0), _trained("wflw98", 1)
    path = _checkpoint(tmp_path, source, "wflw98", ema={"module": averaged.state_dict(), "decay": 0.9, "updates": 3})
    target = make_model(scheme="wflw98", **TINY)
    transfer = init_from_checkpoint(target, path)
    assert transfer.weights == "ema" and transfer.skipped == []
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    assert "0 re-initialised" in transfer.lines()[0]


def test_other_point_count_keeps_backbone_and_graph_convs_and_reinitialises_point_layers(tmp_path):
    source = _trained("wflw98", 0)
    path = _checkpoint(tmp_path, source, "wflw98")
    target = make_model(scheme="300w68", **TINY)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    transfer = init_from_checkpoint(target, path)
    skipped = dict(transfer.skipped)
    assert transfer.weights == "model"
    for key in ("shape_prior", "neck.to_points.0.weight", "head.input.conv.edge_logits", "head.output.edge_logits"):
        assert skipped[key] == "shape differs"
        torch.testing.assert_close(target.state_dict()[key], fresh[key], rtol=0, atol=0)
    for key in ("backbone.conv1.weight", "neck.reduce.0.weight", "head.blocks.0.first.conv.weight"):
        assert key in transfer.loaded
        torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key], rtol=0, atol=0)
    assert any("shape differs" in line and "shape_prior" in line for line in transfer.lines())


def test_another_scheme_with_the_same_point_count_does_not_inherit_point_indexed_weights(tmp_path):
    mine = dict(WFLW98.to_dict(), name="my98")
    source = _trained("wflw98", 0)
    path = _checkpoint(tmp_path, source, "wflw98")
    target = make_model(scheme=mine, **TINY)
    transfer = init_from_checkpoint(target, path)
    skipped = dict(transfer.skipped)
    assert set(skipped) == set(target.point_indexed_keys())
    assert {"shape_prior", "neck.to_points.0.weight", "head.input.conv.edge_logits", "head.output.edge_logits"} <= \
        set(skipped)
    assert skipped["shape_prior"] == "landmark scheme differs: wflw98 -> my98"
    assert "backbone.conv1.weight" in transfer.loaded


def test_the_per_image_relation_learner_output_is_edge_indexed():
    model = make_model(scheme="wflw98", **dict(TINY, adjacency="dynamic"))
    keys = set(model.point_indexed_keys())
    assert {"head.relation_learner.net.3.weight", "head.relation_learner.net.3.bias"} <= keys
    assert not any(k.startswith("head.relation_learner.net.0") for k in keys)


def test_init_from_a_missing_or_foreign_file(tmp_path):
    target = make_model(scheme="wflw98", **TINY)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_from_checkpoint(target, str(tmp_path / "nope.pt"))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a structalign checkpoint"):
        init_from_checkpoint(target, str(tmp_path / "foreign.pt"))
