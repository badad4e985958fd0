"""The L-GRN model and its baselines: shapes, adjacency, graph convolution, geometry, bad input.

    .venv/bin/python -m pytest -q tests/models/test_lgrn_model.py
"""
import numpy as np
import pytest
import torch

from structalign.landmarks import COFW29, IBUG68, WFLW98
from structalign.models import GraphConv, LGRNHead, message_graph
from structalign.ops.graph import LandmarkGraph

from model_helpers import TINY, make_model


@pytest.mark.parametrize("scheme", ["wflw98", "300w68", "cofw29"])
@pytest.mark.parametrize("adjacency", ["static", "dynamic"])
def test_output_shape_per_scheme_and_adjacency(scheme, adjacency):
    model = make_model(scheme=scheme, adjacency=adjacency, **TINY)
    n = {"wflw98": 98, "300w68": 68, "cofw29": 29}[scheme]
    out, visibility = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, n, 2) and visibility.shape == (2, n)
    (out.sum() + visibility.sum()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("kw", [dict(arch="fc"), dict(map_to_node="multiscale"), dict(backbone="resnet50"),
                                dict(backbone="resnet34", image_size=96)])
def test_variants_forward(kw):
    model = make_model(**{**TINY, **kw})
    size = kw.get("image_size", 64)
    points, visibility = model(torch.rand(2, 3, size, size))
    assert points.shape == (2, 98, 2) and visibility.shape == (2, 98)


def test_graphs_of_the_schemes():
    assert message_graph(WFLW98).num_edges == 470  # the RelationLearner's output size in the paper's code
    assert message_graph(IBUG68).num_edges == 68 + 2 * len(IBUG68.edges)
    assert message_graph(COFW29).num_edges == 29 + 2 * len(COFW29.edges)


def test_per_image_adjacency_rows_sum_to_one_and_differ_between_images():
    model = make_model(adjacency="dynamic", **TINY).eval()
    torch.nn.init.normal_(model.head.relation_learner.net[-1].weight, std=1.0)
    adj = model.adjacency(torch.rand(3, 3, 64, 64))
    assert adj.shape == (3, 4, 98, 98)
    torch.testing.assert_close(adj.sum(-1), torch.ones(3, 4, 98))
    mask = message_graph(WFLW98).dense_mask()
    assert (adj[:, :, ~mask] == 0).all()
    assert not torch.allclose(adj[0], adj[1])
    torch.testing.assert_close(adj[:, 0], adj[:, 3])  # one predicted adjacency shared by every layer


def test_static_adjacency_starts_uniform_over_each_neighbourhood():
    model = make_model(**TINY)
    adj = model.adjacency(torch.rand(2, 3, 64, 64))
    degree = message_graph(WFLW98).dense_mask().sum(1).float()
    torch.testing.assert_close(adj.amax(-1), (1 / degree).expand(2, 4, 98))


def test_graph_conv_matches_the_dense_semgraphconv_formula():
    graph = LandmarkGraph.from_edges(5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2)])
    conv = GraphConv(6, 3, graph, op_backend="reference")
    torch.nn.init.normal_(conv.edge_logits)
    x = torch.randn(2, 5, 6)
    mask = graph.dense_mask()
    dense = torch.full((5, 5), -9e15)
    dense[graph.rows, graph.indices] = conv.edge_logits.detach()
    a = torch.softmax(dense, dim=1)
    eye = torch.eye(5)
    expected = (a * eye) @ (x @ conv.weight[0]) + (a * (1 - eye) * mask) @ (x @ conv.weight[1]) + conv.bias
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_output_is_the_shape_prior_when_the_head_is_silent():
    mean_shape = np.random.default_rng(0).uniform(10, 54, size=(98, 2))
    model = make_model(mean_shape=mean_shape, **TINY).eval()
    torch.nn.init.zeros_(model.head.output.weight)
    torch.nn.init.zeros_(model.head.output.bias)
    out, _ = model(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(out, torch.as_tensor(mean_shape, dtype=torch.float32).expand(2, -1, -1))
    # A 96 x 128 input is resized to the network's 64 px and the points scaled back (pixel centres at integers).
    scale = torch.tensor([1.5, 2.0])
    torch.testing.assert_close(model(torch.rand(1, 3, 128, 96))[0],
                               ((torch.as_tensor(mean_shape, dtype=torch.float32) + 0.5) * scale - 0.5)[None])


def test_other_input_size_is_resized_and_scaled_back():
    model = make_model(**TINY).eval()
    big = torch.rand(2, 3, 128, 128)
    small = torch.nn.functional.interpolate(big, size=(64, 64), mode="bilinear", align_corners=False,
                                            antialias=True)
    torch.testing.assert_close(model(big)[0], (model(small)[0] + 0.5) * 2 - 0.5)


def test_channels_last_gives_the_same_output():
    model = make_model(**TINY).eval()
    x = torch.rand(2, 3, 64, 64)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


def test_input_normalisation_makes_the_model_invariant_to_intensity_scale():
    model = make_model(**TINY).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model(x * 255.0), model(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=100), "multiple of 32"),
    (dict(adjacency="learned"), "adjacency"),
    (dict(map_to_node="pooled"), "map_to_node"),
    (dict(arch="hrnet"), "arch"),
    (dict(backbone="resnet101"), "backbone"),
    (dict(op_backend="cuda"), "op_backend"),
    (dict(head_width=0), "head_width"),
    (dict(scheme="wflw99"), "no landmark scheme"),
    (dict(mean_shape=np.zeros((68, 2))), r"mean_shape must have shape \[98, 2\]"),
    (dict(mean_shape=np.full((98, 2), np.nan)), "NaN"),
])
def test_bad_build_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_model(**{**TINY, **kw})


def test_bad_images_and_node_count_mismatch():
    model = make_model(**TINY)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(2, 1, 64, 64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    head = LGRNHead(16, message_graph(WFLW98), width=8, num_blocks=0)
    with pytest.raises(ValueError, match=r"\[B, 98, F\]"):
        head(torch.rand(2, 68, 16))


@pytest.mark.parametrize("op_backend", ["reference", "cpp"])  # cpp: through the fused graph-conv head
def test_bf16_autocast_keeps_fp32_landmarks(op_backend):
    if op_backend == "cpp":
        pytest.importorskip("structalign._C")
    model = make_model(**{**TINY, "op_backend": op_backend}).eval()
    assert all(conv.fused for conv in model.head.graph_convs())  # built fused by default
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, visibility = model(x)
    assert out.dtype == torch.float32 and visibility.dtype == torch.float32
    torch.testing.assert_close(out, model(x)[0], rtol=0, atol=1.0)


def test_graph_block_hands_the_op_a_channel_contiguous_gradient():
    """BatchNorm over [B * N, C] rows: the statistics (and outputs, gradients) of BatchNorm1d over [B, C, N], and the
    gradient reaching the graph op has unit channel stride, so the fused backward reads it in place (no copy)."""
    from structalign.models.lgrn import GraphBlock

    graph = message_graph(WFLW98)
    block = GraphBlock(16, 24, graph, learn_edges=True, op_backend="reference", fused=False).train()
    x = torch.randn(3, 98, 16, requires_grad=True)
    strides = []
    conv_forward = block.conv.forward

    def recording_forward(*args):
        y = conv_forward(*args)
        y.register_hook(lambda g: strides.append(g.stride()))
        return y

    block.conv.forward = recording_forward
    out = block(x)
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    assert strides and strides[0][-1] == 1, f"gradient strides at the op's output: {strides}"

    bn = torch.nn.BatchNorm1d(24).train()
    bn.load_state_dict({k: v for k, v in block.bn.state_dict().items()})
    bn.running_mean.zero_(), bn.running_var.fill_(1), bn.num_batches_tracked.zero_()
    x2 = x.detach().requires_grad_(True)
    y = torch.relu(bn(conv_forward(x2).transpose(1, 2)).transpose(1, 2))
    (grad_x2,) = torch.autograd.grad(y, x2, grad_out)
    torch.testing.assert_close(out, y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_x, grad_x2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(block.bn.running_var, bn.running_var)


def _head_pair(op_backend, adjacency="static"):
    """(fused head, unfused head) with the same weights; the dynamic head's pooled features."""
    kw = dict(width=12, num_blocks=2, adjacency=adjacency, op_backend=op_backend,
              pooled_channels=8 if adjacency == "dynamic" else None)
    torch.manual_seed(0)
    fused = LGRNHead(20, message_graph(WFLW98), fused=True, **kw)
    plain = LGRNHead(20, message_graph(WFLW98), fused=False, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("adjacency", ["static", "dynamic"])
def test_fused_head_matches_the_unfused_head_cpp(adjacency):
    """Training steps (outputs, every parameter's gradient, BatchNorm buffers) and then evaluation agree."""
    pytest.importorskip("structalign._C")
    fused, plain = _head_pair("cpp", adjacency)
    pooled = torch.randn(3, 8)
    for step in range(2):
        nodes = torch.randn(3, 98, 20) + step
        outs = [head(nodes, pooled) for head in (fused, plain)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(outs[0])
        grads = [torch.autograd.grad(out, list(head.parameters()), grad) for out, head in zip(outs, (fused, plain))]
        for (name, _), a, b in zip(fused.named_parameters(), *grads):
            # sums over the B * N rows (a bias before BatchNorm: 0 exactly, both rounding noise)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    fused.eval(), plain.eval()
    nodes = torch.randn(2, 98, 20)
    torch.testing.assert_close(fused(nodes, pooled[:2]), plain(nodes, pooled[:2]), atol=1e-5, rtol=1e-5)


def test_reference_backend_fused_head_matches_the_unfused_one_bitwise():
    fused, plain = _head_pair("reference")
    nodes = torch.randn(2, 98, 20, requires_grad=True)
    outs = [head(nodes) for head in (fused, plain)]
    assert torch.equal(outs[0], outs[1])
    grads = [torch.autograd.grad(out.square().sum(), [nodes, *head.parameters()]) for out, head in
             zip(outs, (fused, plain))]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_fused_and_unfused_heads_share_state_dict_keys_and_checkpoints():
    """Checkpoints of the unfused head load into the fused one unchanged, and back."""
    fused, plain = _head_pair("reference")
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(fused.state_dict()[k].shape == v.shape for k, v in plain.state_dict().items())
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)


def test_build_model_fused_layers_flag():
    """make_model(fused_layers=False) builds the unfused head (for A/B runs); the state dicts match."""
    fused, plain = make_model(**TINY), make_model(**TINY, fused_layers=False)
    assert all(c.fused for c in fused.head.graph_convs()) and not any(c.fused for c in plain.head.graph_convs())
    plain.load_state_dict(fused.state_dict(), strict=True)
