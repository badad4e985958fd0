"""The L-GRN model learns: 200 Adam steps on 8 fixed synthetic faces cut the training NME by at least 5x, and the
C++ ops give the reference ops' loss curve.

    .venv/bin/python -m pytest -q tests/models/test_model_learns.py
"""
import pytest
import torch

from structalign.losses import build_criterion
from structalign.metrics import per_image_nme
from structalign.ops.backend import cpp_available

from model_helpers import make_model

SIZE, BATCH, STEPS = 64, 8, 200


def synthetic_faces():
    """8 images of 98 dots (a fixed random template, moved and scaled per face) and their landmarks in pixels."""
    g = torch.Generator().manual_seed(0)
    template = torch.rand(98, 2, generator=g) * 2 - 1
    template[60], template[72] = torch.tensor([-0.5, -0.2]), torch.tensor([0.5, -0.2])  # outer eye corners
    centre = 24 + 16 * torch.rand(BATCH, 1, 2, generator=g)
    scale = 10 + 8 * torch.rand(BATCH, 1, 1, generator=g)
    target = centre + scale * template
    grid = torch.arange(SIZE) + 0.5  # pixel-centre convention
    d2 = (grid.view(1, 1, 1, -1) - target[..., 0, None, None]) ** 2 + \
         (grid.view(1, 1, -1, 1) - target[..., 1, None, None]) ** 2
    dots = torch.exp(-d2 / 2).amax(1)
    images = torch.stack([dots, 0.5 * dots, 1 - dots], 1) + 0.05 * torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    return images, target


def train(graph_backend: str, loss_backend: str):
    images, target = synthetic_faces()
    torch.manual_seed(1)
    model = make_model(backbone="resnet18", image_size=SIZE, head_width=32, num_blocks=1, backbone_width=8,
                        op_backend=graph_backend)
    criterion = build_criterion(scheme="wflw98", op_backend=loss_backend)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def train_nme():
        model.eval()
        with torch.no_grad():
            nme = per_image_nme(model(images)[0], target, "wflw98").mean()
        model.train()
        return nme

    # Tensors this small only lose from threading (badly so on a loaded machine), and one thread keeps runs
    # bit-reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, losses = train_nme(), []
        for _ in range(STEPS):
            loss, _ = criterion(model(images)[0], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return before, train_nme(), torch.tensor(losses)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_run():
    return train("reference", "reference")


def test_model_learns_with_reference_ops(reference_run):
    before, after, losses = reference_run
    assert before > 0.3
    assert after * 5 <= before, f"training NME {before:.3f} -> {after:.3f}"
    assert losses[-10:].mean() * 20 < losses[0]


def test_cpp_ops_give_the_reference_loss_curve(reference_run):
    graph_cpp = cpp_available("cpu", "graph_message_passing")
    loss_cpp = cpp_available("cpu", "relative_location_loss")
    if not (graph_cpp or loss_cpp):
        pytest.skip("structalign._C has no CPU kernel for either op yet")
    before, after, losses = train("cpp" if graph_cpp else "reference", "cpp" if loss_cpp else "reference")
    _, _, ref_losses = reference_run
    # Float summation order differs between backends and Adam amplifies it once gradients are small (measured:
    # <= 0.4 % apart over the first 30 steps, ~10 % near the end), so: step by step early, 20-step means later.
    torch.testing.assert_close(losses[:30], ref_losses[:30], rtol=2e-2, atol=0)
    torch.testing.assert_close(losses.view(-1, 20).mean(1), ref_losses.view(-1, 20).mean(1), rtol=0.25, atol=0)
    assert after * 5 <= before, f"training NME {before:.3f} -> {after:.3f}"
