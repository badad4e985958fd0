"""The visibility head, its loss and the visibility-gated L-GRN adjacency."""
import pytest
import torch

from structalign.losses import visibility_loss

from model_helpers import TINY, make_model


def test_gate_scales_each_neighbour_weight_by_its_visibility_and_renormalises():
    torch.manual_seed(0)
    model = make_model(**TINY, visibility_gate=True).eval()
    head, graph = model.head, model.head.graph
    logits = torch.randn(2, graph.num_nodes)
    with torch.no_grad():
        head.gate_scale.copy_(torch.tensor([0.7, 1.5]))  # self edges, other edges
    gated = head.adjacency(batch=2, visibility_logits=logits)  # [B, L, N, N]
    plain = head.adjacency(batch=2, visibility_logits=torch.full_like(logits, 30.0))  # P(visible) = 1: no gate
    p = torch.sigmoid(logits)
    # Expected: w_ij = plain_ij * p_j^1.5 (j != i), w_ii = plain_ii * p_i^0.7, each row renormalised.
    factor = (p ** 1.5)[:, None, None, :].repeat(1, 1, graph.num_nodes, 1)
    eye = torch.eye(graph.num_nodes, dtype=torch.bool)
    factor[:, :, eye] = (p ** 0.7)[:, None, :]
    expected = plain * factor
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-6)


def test_gate_uses_per_face_logits_in_every_conv_and_its_scale_learns():
    torch.manual_seed(0)
    model = make_model(**TINY, visibility_gate=True)
    # At the start every point has P(visible) = 0.75: a constant added to every logit, which the softmax ignores.
    torch.nn.init.normal_(model.visibility.output.weight, std=0.1)
    images = torch.rand(3, 3, 64, 64)
    points, visibility = model(images)
    points.sum().backward()
    assert model.head.gate_scale.grad is not None and model.head.gate_scale.grad.abs().min() > 0  # both scales
    # The gate reads the visibility logits detached: the landmark loss does not train the visibility head.
    assert all(p.grad is None or not p.grad.any() for p in model.visibility.parameters())
    # A different visibility for one face changes that face's landmarks only.
    model.eval()
    with torch.no_grad():
        features = model.features(images)
        head_input = model.head_input(features)
        base = model.head(*head_input, model.visibility_logits(features))
        changed = model.visibility_logits(features).clone()
        changed[1, :10] = -8.0
        moved = model.head(*head_input, changed)
    assert torch.equal(moved[0], base[0]) and torch.equal(moved[2], base[2]) and not torch.equal(moved[1], base[1])


def test_static_edge_softmax_matches_the_ungated_head_when_everything_is_visible():
    model = make_model(**TINY, visibility_gate=True).eval()
    ungated = make_model(**TINY).eval()
    ungated.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        model.visibility.output.bias.fill_(40.0)  # P(visible) = 1 for every point
        model.visibility.output.weight.zero_()
        x = torch.rand(2, 3, 64, 64)
        torch.testing.assert_close(model(x)[0], ungated(x)[0], rtol=1e-5, atol=1e-4)


def test_visibility_heads_and_their_absence():
    for kw in (dict(arch="fc"), dict(), dict(adjacency="dynamic", visibility_gate=True)):
        points, visibility = make_model(**TINY, **kw)(torch.rand(2, 3, 64, 64))
        assert visibility.shape == (2, 98) and visibility.dtype == torch.float32
        # Started at P(visible) = 0.75, the share of visible points under the training augmentation.
        torch.testing.assert_close(torch.sigmoid(visibility), torch.full((2, 98), 0.75))
    assert make_model(**TINY, visibility_head=False)(torch.rand(1, 3, 64, 64))[1] is None
    model = make_model(**TINY)
    assert {"visibility.output.weight", "visibility.output.bias"} <= set(model.point_indexed_keys())


@pytest.mark.parametrize("kw", [dict(arch="fc", visibility_gate=True), dict(visibility_head=False, visibility_gate=True)])
def test_gate_without_its_inputs_is_refused(kw):
    with pytest.raises(ValueError, match="visibility_gate needs"):
        make_model(**TINY, **kw)


def test_visibility_loss_counts_labelled_points_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, -1.0, -1.0]])
    loss = visibility_loss(logits, labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], labels[:, :2])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, 2:].eq(0).all() and logits.grad[0, :2].ne(0).all()


def test_visibility_loss_without_labels_is_zero_and_keeps_the_graph():
    logits = torch.randn(2, 5, requires_grad=True)
    loss = visibility_loss(logits, torch.full((2, 5), -1.0))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()
    with pytest.raises(ValueError, match="visibility logits have shape"):
        visibility_loss(logits, torch.zeros(2, 4))

