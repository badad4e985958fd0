"""`structalign predict` on photos and folders: detection by default, JSON and CSV schema, several boxes per image
from --boxes, --flip-test, a batch that goes on past bad files and lists them at the end (exit status 1), and a
photo without a face, listed as a result (exit status 0)."""
import csv
import json

import numpy as np
from PIL import Image

from structalign.cli import main


def test_folder_batch_goes_on_past_bad_files(checkpoint, astronaut, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    Image.fromarray(astronaut).save(photos / "a_astronaut.jpg")
    Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)).save(photos / "more" / "b_two.png")
    (photos / "c_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(photos / "d_blank.png")
    out = tmp_path / "out"
    missing = tmp_path / "missing.jpg"
    assert main(["predict", checkpoint, str(photos), str(missing), "--out", str(out), "--flip-test"]) == 1
    captured = capsys.readouterr()
    assert "3 image(s) or frame(s), 3 face(s)" in captured.out
    assert f"no face found in 1 image(s): {photos / 'd_blank.png'}" in captured.out  # a result, not a failure
    lines = captured.err.strip().splitlines()
    assert lines[-3] == "2 input(s) skipped:"
    assert lines[-2] == f"  {missing}: no such file or folder"
    assert lines[-1].startswith(f"  {photos / 'c_broken.jpg'}: cannot read image")
    written = json.loads((out / "landmarks.json").read_text())
    assert written["scheme"] == "wflw98" and "pixel centres at integers" in written["convention"]
    images = {i["source"]: i for i in written["images"]}
    assert [len(images[str(photos / n)]["faces"]) for n in ("a_astronaut.jpg", "more/b_two.png")] == [1, 2]
    assert images[str(photos / "d_blank.png")]["error"] is None and images[str(photos / "d_blank.png")]["faces"] == []
    assert images[str(photos / "c_broken.jpg")]["error"].startswith(f"{photos / 'c_broken.jpg'}: cannot read image")
    face = images[str(photos / "a_astronaut.jpg")]["faces"][0]
    assert set(face) == {"box", "score", "landmarks", "visibility"} and len(face["landmarks"]) == 98
    assert 0.5 <= face["score"] <= 1
    with open(out / "landmarks.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:9] == ["source", "frame", "face", "track", "box_x0", "box_y0", "box_x1", "box_y1", "score"]
    assert rows[0][9:13] == ["x0", "y0", "x1", "y1"] and len(rows) == 1 + 3
    row = next(r for r in rows[1:] if r[0].endswith("a_astronaut.jpg"))
    np.testing.assert_allclose(np.array(row[9:9 + 2 * 98], float).reshape(98, 2), face["landmarks"], atol=2e-3)
    # The pictures before and after the broken one keep their overlays.
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_a_astronaut.png", "0002_d_blank.png",
                                                         "0003_b_two.png"]


def test_a_photo_without_a_face_is_listed_and_the_exit_status_is_0(checkpoint, astronaut, tmp_path, capsys):
    from skimage.data import coins

    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    Image.fromarray(coins()).save(tmp_path / "coins.png")  # a grey photograph of coins: no face
    out = tmp_path / "out"
    assert main(["predict", checkpoint, str(tmp_path / "astronaut.png"), str(tmp_path / "coins.png"),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 image(s) or frame(s), 1 face(s)" in captured.out
    assert f"no face found in 1 image(s): {tmp_path / 'coins.png'}" in captured.out and "skipped" not in captured.err
    images = json.loads((out / "landmarks.json").read_text())["images"]
    assert [(i["source"], i["error"], len(i["faces"])) for i in images] == [
        (str(tmp_path / "astronaut.png"), None, 1), (str(tmp_path / "coins.png"), None, 0)]
    with open(out / "landmarks.csv") as f:
        assert [r[0] for r in csv.reader(f)][1:] == [str(tmp_path / "astronaut.png")]


def test_boxes_file_gives_several_faces_per_image(checkpoint, astronaut, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("180 70 265 165   10 10 90 90\n")
    out = tmp_path / "out"
    assert main(["predict", checkpoint, str(tmp_path / "astronaut.png"), "--boxes", str(boxes), "--out",
                 str(out), "--no-overlays"]) == 0
    faces = json.loads((out / "landmarks.json").read_text())["images"][0]["faces"]
    assert [f["box"] for f in faces] == [[180, 70, 265, 165], [10, 10, 90, 90]]
    assert [f["score"] for f in faces] == [None, None] and not list(out.glob("*.png"))
    boxes.write_text("180 70 265 165 10\n")
    assert main(["predict", checkpoint, str(tmp_path / "astronaut.png"), "--boxes", str(boxes)]) == 1
