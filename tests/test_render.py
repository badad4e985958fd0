"""The one drawing function of every overlay (eval's pictures, predict's pictures and video frames) and the CED plot.

    .venv/bin/python -m pytest -q tests/test_render.py
"""
import numpy as np
import pytest
from PIL import Image

from structalign.data import DatasetError
from structalign.render import (BOX_COLOUR, PREDICTION_COLOUR, REFERENCE_COLOUR, draw_landmarks, plot_ced,
                                save_overlay)


def test_draw_landmarks_dots_on_pixel_centres_boxes_and_layer_order():
    image = np.zeros((400, 400, 3), np.uint8)  # dot radius 2 px
    out = draw_landmarks(image, points=[np.array([[100.0, 50.0]])],
                         reference=[np.array([[100.0, 50.0], [300.0, 200.0]])], boxes=[(20.0, 30.0, 380.0, 390.0)])
    assert (image == 0).all()  # a copy is drawn on
    assert tuple(out[50, 100]) == PREDICTION_COLOUR  # the prediction is drawn over the reference
    assert tuple(out[200, 300]) == REFERENCE_COLOUR
    # Pixel centres at integers: a dot at (100, 50) is symmetric about pixel (100, 50).
    np.testing.assert_allclose(out[50, 97:100, 0].astype(int), out[50, 101:104, 0][::-1], atol=5)
    np.testing.assert_allclose(out[47:50, 100, 0].astype(int), out[51:54, 100, 0][::-1], atol=5)
    assert 0 < out[50, 97, 0] < 255 and out[50, 104].max() == 0  # anti-aliased edge, radius 2
    for y, x in ((30, 200), (390, 200), (200, 20), (200, 380)):  # the box's four sides
        assert out[y, x, 0] > 0 and out[y, x, 1] > 0 and out[y, x, 2] == BOX_COLOUR[2]
    assert out[250, 100].max() == 0 and out[200, 310].max() == 0
    with pytest.raises(ValueError, match=r"RGB image of shape \[H, W, 3\], got \[400, 400\]"):
        draw_landmarks(image[..., 0], points=[np.zeros((1, 2))])


def test_save_overlay_reads_draws_and_writes(tmp_path):
    source = tmp_path / "face.jpg"
    Image.fromarray(np.full((80, 120, 3), 128, np.uint8)).save(source)
    out = save_overlay(str(source), str(tmp_path / "new" / "overlay.png"), points=[np.array([[30.0, 40.0]])],
                       reference=[np.array([[90.0, 20.0]])])
    picture = np.asarray(Image.open(out))
    assert picture.shape == (80, 120, 3)
    assert tuple(picture[40, 30]) == PREDICTION_COLOUR and tuple(picture[20, 90]) == REFERENCE_COLOUR
    assert tuple(picture[70, 5]) == (128, 128, 128)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        save_overlay(str(tmp_path / "broken.png"), str(tmp_path / "o.png"), points=[np.zeros((1, 2))])
    with pytest.raises(DatasetError, match="cannot read image .*missing.png"):
        save_overlay(str(tmp_path / "missing.png"), str(tmp_path / "o.png"), points=[np.zeros((1, 2))])


def test_plot_ced_writes_a_png(tmp_path):
    path = tmp_path / "ced.png"
    plot_ced({"lgrn": [0.02, 0.05, 0.12], "fc": [0.04, 0.09, 0.2]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_ced({"lgrn": [0.02]}, tmp_path / "missing" / "ced.png")
