"""Readers of WFLW, 300W, COFW (.mat v7.3 and v5), COCO-keypoints JSON and imglab XML, on small files written here
in each publisher's layout; malformed input must name file and line, or be skipped and counted on request."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from structalign.data import OCCLUDED, UNLABELLED, VISIBLE, DatasetError, open_dataset, split_validation
from structalign.data.commands import check
from structalign.data.synth import render_dataset, render_face
from structalign.data.wflw import annotation_path, visibility_path


def _jpeg(path, width=40, height=30):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def _wflw_line(points, box, flags, name):
    return " ".join([f"{v:.2f}" for v in np.asarray(points).ravel()] + [str(v) for v in box] +
                    [str(v) for v in flags] + [name])


@pytest.fixture
def wflw_root(tmp_path):
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, count in (("train", 3), ("test", 4)):
        for i in range(count):
            name = f"ev/{split}{i}.jpg"
            _jpeg(str(tmp_path / "WFLW_images" / name))
            flags = [int(i == k) for k in range(6)]
            lines[split].append(_wflw_line(rng.uniform(2, 28, (98, 2)), (1, 2, 30, 28), flags, name))
    ann = tmp_path / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    for split, rows in lines.items():
        (ann / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_wflw_reads_fields_and_subsets(wflw_root):
    ds = open_dataset(str(wflw_root), "wflw", "train")
    assert len(ds) == 3 and ds.scheme.num_points == 98
    r = ds[1]
    assert r.landmarks.shape == (98, 2) and r.landmarks.dtype == np.float32
    np.testing.assert_array_equal(r.box, [1, 2, 30, 28])
    np.testing.assert_array_equal(r.attributes, [0, 1, 0, 0, 0, 0])
    assert os.path.isfile(r.image_path)
    assert all(np.all(r.visibility == UNLABELLED) for r in ds.records) and not ds.has_visibility_labels  # no sidecar
    assert len(open_dataset(str(wflw_root), "wflw", "test")) == 4
    assert len(open_dataset(str(wflw_root), "wflw", "pose")) == 1
    assert len(open_dataset(str(wflw_root), "wflw", "largepose")) == 1
    assert len(open_dataset(str(wflw_root), "wflw", "blur")) == 0


def _corrupt(root, text_line_2):
    path = annotation_path(str(root), "train")
    lines = open(path).read().splitlines()
    lines[1] = text_line_2
    open(path, "w").write("\n".join(lines) + "\n")
    return path


def test_wflw_malformed_line_names_file_and_line(wflw_root):
    path = _corrupt(wflw_root, "1 2 3 bad.jpg")
    with pytest.raises(DatasetError, match=rf"{path}:2: expected 207 fields"):
        open_dataset(str(wflw_root), "wflw", "train")
    ds = open_dataset(str(wflw_root), "wflw", "train", on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1 and ds.skipped[0].line == 2


def test_wflw_non_numeric_and_bad_box(wflw_root):
    good = open(annotation_path(str(wflw_root), "train")).read().splitlines()[0].split()
    _corrupt(wflw_root, " ".join(["x"] + good[1:]))
    with pytest.raises(DatasetError, match=":2: non-numeric"):
        open_dataset(str(wflw_root), "wflw", "train")
    _corrupt(wflw_root, " ".join(good[:196] + ["30", "2", "1", "28"] + good[200:]))
    with pytest.raises(DatasetError, match=":2: face box"):
        open_dataset(str(wflw_root), "wflw", "train")


def test_wflw_missing_image_is_named(wflw_root):
    os.remove(wflw_root / "WFLW_images" / "ev" / "train0.jpg")
    with pytest.raises(DatasetError, match=r":1: image not found: .*train0\.jpg"):
        open_dataset(str(wflw_root), "wflw", "train")
    ds = open_dataset(str(wflw_root), "wflw", "train", on_error="skip")
    assert len(ds) == 2 and "image not found" in str(ds.skipped[0])


def test_wflw_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="list_98pt_rect_attr_train.txt not found"):
        open_dataset(str(tmp_path), "wflw", "train")


def test_bad_arguments(wflw_root):
    with pytest.raises(DatasetError, match="fmt must be one of"):
        open_dataset(str(wflw_root), "afw")
    with pytest.raises(DatasetError, match="WFLW split must be one of"):
        open_dataset(str(wflw_root), "wflw", "val")
    with pytest.raises(DatasetError, match="on_error must be one of"):
        open_dataset(str(wflw_root), "wflw", "train", on_error="ignore")


def _pts(path, points):
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n")


@pytest.fixture
def ibug_root(tmp_path):
    rng = np.random.default_rng(1)
    for folder, count in (("lfpw/trainset", 2), ("helen/trainset", 1), ("afw", 1), ("lfpw/testset", 1),
                          ("helen/testset", 1), ("ibug", 2)):
        for i in range(count):
            d = tmp_path / folder
            _jpeg(str(d / f"img{i}.jpg"))
            _pts(d / f"img{i}.pts", rng.uniform(3, 25, (68, 2)))
    return tmp_path


def test_300w_splits_and_one_based_coordinates(ibug_root):
    counts = {s: len(open_dataset(str(ibug_root), "300w", s)) for s in ("train", "common", "challenging", "full")}
    assert counts == {"train": 4, "common": 2, "challenging": 2, "full": 4}
    ds = open_dataset(str(ibug_root), "300w", "challenging")
    raw = np.loadtxt(str(ibug_root / "ibug" / "img0.pts"), skiprows=3, max_rows=68)
    np.testing.assert_allclose(ds[0].landmarks, raw - 1, atol=1e-3)
    lm = ds[0].landmarks
    np.testing.assert_allclose(ds[0].box, [*lm.min(0), *lm.max(0)])
    assert ds.scheme.name == "300w68" and ds[0].attributes is None


def test_300w_bad_point_line_and_missing_image(ibug_root):
    pts = ibug_root / "ibug" / "img1.pts"
    lines = pts.read_text().splitlines()
    lines[6] = "12.0 oops"
    pts.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{pts}:7: could not convert|{pts}:7: .*oops"):
        open_dataset(str(ibug_root), "300w", "challenging")
    os.remove(ibug_root / "ibug" / "img0.jpg")
    ds = open_dataset(str(ibug_root), "300w", "challenging", on_error="skip")
    assert len(ds) == 0 and len(ds.skipped) == 2
    assert any("no image beside it" in str(s) for s in ds.skipped)


def _cofw_arrays(n, rng):
    images = [rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8) for i in range(n)]
    images[-1] = images[-1][..., 0]  # COFW has grey images too
    phis = np.concatenate([rng.uniform(5, 35, (n, 29)), rng.uniform(5, 25, (n, 29)),
                           (rng.random((n, 29)) < 0.3).astype(float)], axis=1)
    boxes = np.tile([3.0, 4.0, 30.0, 20.0], (n, 1))
    return images, phis, boxes


def _write_cofw_v73(path, images, phis, boxes, keys):
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        ref_list = []
        for i, im in enumerate(images):
            refs.create_dataset(str(i), data=im.T)  # MATLAB column-major, as v7.3 files store it
            ref_list.append(refs[str(i)].ref)
        f.create_dataset(keys[0], data=np.array(ref_list, dtype=h5py.ref_dtype)[None, :])
        f.create_dataset(keys[1], data=phis.T)
        f.create_dataset(keys[2], data=boxes.T)


@pytest.mark.parametrize("version", ["v7.3", "v5"])
def test_cofw_mat_reader(tmp_path, version):
    rng = np.random.default_rng(2)
    images, phis, boxes = _cofw_arrays(3, rng)
    path = str(tmp_path / "COFW_train_color.mat")
    if version == "v7.3":
        _write_cofw_v73(path, images, phis, boxes, ("IsTr", "phisTr", "bboxesTr"))
    else:
        cells = np.empty((3, 1), dtype=object)
        for i, im in enumerate(images):
            cells[i, 0] = im
        scipy.io.savemat(path, {"IsTr": cells, "phisTr": phis, "bboxesTr": boxes})
    ds = open_dataset(str(tmp_path), "cofw", "train")
    assert len(ds) == 3 and ds.scheme.name == "cofw29"
    np.testing.assert_allclose(ds[1].landmarks[:, 0], phis[1, :29] - 1, atol=1e-4)
    np.testing.assert_allclose(ds[1].landmarks[:, 1], phis[1, 29:58] - 1, atol=1e-4)
    np.testing.assert_array_equal(ds[1].visibility, 1 - phis[1, 58:])
    np.testing.assert_allclose(ds[0].box, [2, 3, 32, 23])
    extracted = np.asarray(Image.open(ds[1].image_path))
    np.testing.assert_array_equal(extracted, images[1])
    assert np.asarray(Image.open(ds[2].image_path)).shape == images[2].shape
    assert len(open_dataset(str(tmp_path), "cofw", "train")) == 3  # second open reuses the extracted images


def test_cofw_wrong_layout_and_corrupt_file(tmp_path):
    path = tmp_path / "COFW_test_color.mat"
    scipy.io.savemat(str(path), {"IsT": np.zeros((1, 1)), "phisT": np.zeros((1, 10)), "bboxesT": np.zeros((1, 4))})
    with pytest.raises(DatasetError, match="phisT must be n x 87"):
        open_dataset(str(tmp_path), "cofw", "test")
    path.write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="cannot read as a MATLAB file"):
        open_dataset(str(tmp_path), "cofw", "test")
    with pytest.raises(DatasetError, match="COFW train file not found"):
        open_dataset(str(tmp_path), "cofw", "train")


def test_coco_keypoints_json(tmp_path):
    rng = np.random.default_rng(3)
    images, annotations = [], []
    for i in range(3):
        _jpeg(str(tmp_path / "images" / f"{i}.jpg"))
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 30, "width": 40})
        kp = np.concatenate([rng.uniform(2, 28, (68, 2)), np.full((68, 1), 2.0)], axis=1)
        kp[5, 2], kp[6, 2] = 0, 1
        annotations.append({"id": 10 + i, "image_id": i, "keypoints": kp.ravel().tolist(), "bbox": [1, 2, 20, 25],
                            "num_keypoints": 68, "category_id": 1, "iscrowd": 0})
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "face_landmarks_300w_train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    ds = open_dataset(str(tmp_path), "coco", "train")
    assert len(ds) == 3 and ds.scheme.name == "300w68"
    np.testing.assert_allclose(ds[0].box, [1, 2, 21, 27])
    assert ds[0].visibility[5] == UNLABELLED and ds[0].visibility[6] == OCCLUDED  # v = 0, v = 1
    assert np.all(np.delete(ds[0].visibility, [5, 6]) == VISIBLE) and ds.has_visibility_labels  # v = 2
    np.testing.assert_allclose(ds[0].landmarks[5], np.reshape(annotations[0]["keypoints"], (-1, 3))[5, :2], atol=1e-4)
    bad = json.loads(ann.read_text())
    bad["annotations"][2]["keypoints"][3 * 7 + 2] = 3
    ann.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"annotation:3: keypoint flags v must be 0, 1 or 2, got \[3.0\]"):
        open_dataset(str(tmp_path), "coco", "train")
    del annotations[1]["bbox"]
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(DatasetError, match=r"annotation:2: missing key 'bbox'"):
        open_dataset(str(tmp_path), "coco", "train")
    assert len(open_dataset(str(tmp_path), "coco", "train", on_error="skip")) == 2
    ann.write_text("{\n  \"images\": [,\n")
    with pytest.raises(DatasetError, match=r"face_landmarks_300w_train.json:2: not valid JSON"):
        open_dataset(str(tmp_path), "coco", "train")


def test_imglab_xml(tmp_path):
    rng = np.random.default_rng(4)
    _jpeg(str(tmp_path / "a.jpg"))
    points = rng.uniform(2, 28, (68, 2))
    parts = "".join(f"<part name='{i:02d}' x='{x:.2f}' y='{y:.2f}'/>" for i, (x, y) in enumerate(points))
    xml = (f"<?xml version='1.0'?><dataset><images><image file='a.jpg'>"
           f"<box top='2' left='1' width='20' height='25'>{parts}</box>"
           f"<box top='2' left='1' width='20' height='25' ignore='1'/>"
           f"</image></images></dataset>")
    (tmp_path / "labels_ibug_300W_train.xml").write_text(xml)
    ds = open_dataset(str(tmp_path), "xml", "train")
    assert len(ds) == 1 and len(ds.skipped) == 1 and "ignore" in ds.skipped[0].reason
    np.testing.assert_allclose(ds[0].landmarks, points, atol=1e-2)
    np.testing.assert_allclose(ds[0].box, [1, 2, 21, 27])
    (tmp_path / "labels_ibug_300W_train.xml").write_text(xml.replace("x='", "x='q", 1))
    with pytest.raises(DatasetError, match="malformed <part>"):
        open_dataset(str(tmp_path), "xml", "train")


def test_split_validation_is_deterministic_and_disjoint(synth_root):
    ds = open_dataset(synth_root, "wflw", "train")
    train, val = split_validation(ds, fraction=0.25, seed=3)
    again_train, again_val = split_validation(ds, fraction=0.25, seed=3)
    paths = lambda d: [r.image_path for r in d.records]  # noqa: E731
    assert len(val) == 4 and len(train) == 12
    assert paths(val) == paths(again_val) and paths(train) == paths(again_train)
    assert not set(paths(train)) & set(paths(val))
    assert paths(split_validation(ds, 0.25, seed=4)[1]) != paths(val)
    with pytest.raises(ValueError, match="fraction"):
        split_validation(ds, fraction=1.5)


def test_data_check_reports_counts_and_problems(wflw_root):
    lines = []
    assert check(str(wflw_root), out=lines.append) == 0
    assert "wflw train: 3 faces (wflw98), 0 problems" in lines
    assert "wflw test subset pose: 1 faces" in lines
    os.remove(wflw_root / "WFLW_images" / "ev" / "test1.jpg")
    _corrupt(wflw_root, "broken line")
    lines = []
    assert check(str(wflw_root), out=lines.append) == 2
    train = lines.index("wflw train: 2 faces (wflw98), 1 problem")
    test = lines.index("wflw test: 3 faces (wflw98), 1 problem")
    assert lines[train + 1] == "    bad annotation: 1" and lines[test + 1] == "    missing image: 1"


def test_wflw_visibility_sidecar_round_trip(tmp_path):
    paths = render_dataset(str(tmp_path), 12, 6, seed=3, width=128, height=128, workers=1, occlusion=1.0)
    for split, count in (("train", 12), ("test", 6)):
        ds = open_dataset(str(tmp_path), "wflw", split)
        rendered = np.stack([render_face(np.random.default_rng([3, 1 if split == "train" else 2, i]), 128, 128,
                                         occlusion=1.0)[4] for i in range(count)])
        np.testing.assert_array_equal(np.stack([r.visibility for r in ds.records]), rendered)
        assert ds.has_visibility_labels and (rendered == OCCLUDED).any() and (rendered == VISIBLE).any()
        assert len(open(visibility_path(paths[split])).read().splitlines()) == count
    test = open_dataset(str(tmp_path), "wflw", "test")
    for subset in ("pose", "occlusion"):  # a subset keeps the labels of its lines
        part = open_dataset(str(tmp_path), "wflw", subset)
        assert len(part) > 0
        for r in part.records:
            np.testing.assert_array_equal(r.visibility, test[r.line - 1].visibility)
    os.remove(visibility_path(paths["train"]))
    ds = open_dataset(str(tmp_path), "wflw", "train")
    assert all(np.all(r.visibility == UNLABELLED) for r in ds.records) and not ds.has_visibility_labels


def _rewrite_sidecar(root, edit):
    sidecar = visibility_path(annotation_path(str(root), "train"))
    rows = [line.split() for line in open(sidecar).read().splitlines()]
    edit(rows)
    open(sidecar, "w").write("".join(" ".join(r) + "\n" for r in rows))
    return sidecar


@pytest.mark.parametrize("fault, message", [
    (lambda rows: rows[1].pop(), r"expected 98 visibility labels \(1, 0 or -1\), got 97"),
    (lambda rows: rows[1].__setitem__(7, "2"), r"visibility labels must be 1, 0 or -1, got 2 for point 7"),
    (lambda rows: rows[1].__setitem__(7, "nan"), r"visibility labels must be 1, 0 or -1, got nan for point 7"),
    (lambda rows: rows[1].__setitem__(7, "x"), r"non-numeric visibility label"),
])
def test_wflw_bad_sidecar_line_names_file_and_line(synth_root, tmp_path, fault, message):
    root = shutil.copytree(synth_root, tmp_path / "data")
    sidecar = _rewrite_sidecar(root, fault)
    with pytest.raises(DatasetError, match=rf"{sidecar}:2: {message}"):
        open_dataset(str(root), "wflw", "train")
    ds = open_dataset(str(root), "wflw", "train", on_error="skip")
    assert len(ds) == 15 and [(s.source, s.line) for s in ds.skipped] == [(sidecar, 2)]


def test_wflw_sidecar_of_another_length_is_refused(synth_root, tmp_path):
    root = shutil.copytree(synth_root, tmp_path / "data")
    sidecar = _rewrite_sidecar(root, lambda rows: rows.pop())
    path = annotation_path(str(root), "train")
    with pytest.raises(DatasetError, match=rf"sidecar {sidecar} has 15 lines but the annotation file {path} has 16"):
        open_dataset(str(root), "wflw", "train", on_error="skip")


def test_list_reader_visibility_labels(tmp_path):
    _jpeg(str(tmp_path / "a.jpg"))
    points = np.random.default_rng(5).uniform(2, 28, (68, 2)).round(2).tolist()
    labels = [1] * 66 + [0, -1]
    faces = [{"image": "a.jpg", "box": [1, 2, 30, 28], "landmarks": points, "visibility": labels},
             {"image": "a.jpg", "box": [1, 2, 30, 28], "landmarks": points[::-1]}]
    (tmp_path / "train.json").write_text(json.dumps(faces))
    ds = open_dataset(str(tmp_path), "list", "train")
    np.testing.assert_array_equal(ds[0].visibility, labels)
    assert np.all(ds[1].visibility == UNLABELLED) and ds.has_visibility_labels
    for wrong, message in (([1] * 67 + [2], r"visibility labels must be 1 \(visible\), 0 \(occluded\) or -1 "
                                            r"\(unlabelled\), got 2.0 for point 67"),
                           ([1] * 67, r"67 visibility labels \(shape \[67\]\) for 68 landmarks")):
        faces[1]["visibility"] = wrong
        (tmp_path / "train.json").write_text(json.dumps(faces))
        with pytest.raises(DatasetError, match=rf"{tmp_path / 'train.json'}:2: {message}"):
            open_dataset(str(tmp_path), "list", "train")
