"""Your own landmark set: the list / COCO / imglab readers take a scheme file of any point count, `data scheme`
proposes one from the data, a knn graph is derived on the data's mean shape, and counts that do not match fail before
any training step."""
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from structalign.cli import main
from structalign.data import DatasetError, open_dataset
from structalign.data.commands import check
from structalign.landmarks import SchemeError, knn_neighbors, load_scheme, scheme_from_dict

# A 21-point face-like layout in a unit box: 10 mirrored pairs (i, i + 10 mirrors i) and one point on the midline.
_LEFT = np.array([(0.10, 0.30), (0.15, 0.50), (0.22, 0.68), (0.32, 0.82), (0.25, 0.25), (0.38, 0.24),
                  (0.28, 0.38), (0.38, 0.40), (0.42, 0.60), (0.40, 0.75)])
TEMPLATE21 = np.concatenate([_LEFT, _LEFT * [-1, 1] + [1, 0], [(0.5, 0.9)]])
FLIP21 = tuple(list(range(10, 20)) + list(range(10)) + [20])


def _faces(count: int, seed: int = 0):
    """(image name, box, landmarks[21, 2]) of count faces: the template jittered, scaled and placed in 96 px images."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        size, corner = rng.uniform(40, 60), rng.uniform(10, 30, 2)
        points = (TEMPLATE21 + rng.normal(0, 0.01, TEMPLATE21.shape)) * size + corner
        yield f"face{i}.png", [corner[0], corner[1], corner[0] + size, corner[1] + size], points


def _images(root, count):
    for name, _, _ in _faces(count):
        Image.new("RGB", (96, 96), (120, 90, 60)).save(os.path.join(root, name))


@pytest.fixture
def list_root(tmp_path):
    """ROOT/train.csv (with a header) and ROOT/test.json holding 21-point faces; the JSON carries subset tags."""
    _images(tmp_path, 12)
    faces = list(_faces(12))
    header = "image,x0,y0,x1,y1," + ",".join(f"x{k},y{k}" for k in range(21))
    rows = [",".join([name] + [f"{v:.3f}" for v in list(box) + list(points.ravel())])
            for name, box, points in faces[:8]]
    (tmp_path / "train.csv").write_text("\n".join([header] + rows) + "\n")
    entries = [{"image": name, "box": list(box), "landmarks": points.tolist(),
                "tags": ["profile"] if k % 2 else []} for k, (name, box, points) in enumerate(faces[8:])]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    return str(tmp_path)


def _scheme_file(tmp_path, **changes) -> str:
    spec = {"name": "my21", "num_points": 21, "flip": list(FLIP21),
            "normalization": {"inter_ocular": [[4], [14]]}, "graph": {"from": "relations"},
            "relations": {"knn": 3}}
    spec.update(changes)
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_list_dataset_of_another_point_count_needs_a_scheme(list_root):
    with pytest.raises(DatasetError, match=r"no landmark scheme 21.*data.scheme"):
        open_dataset(list_root, fmt="list", split="train")


def test_a_scheme_file_opens_list_data_and_derives_its_graph_on_the_mean_shape(list_root, tmp_path):
    path = _scheme_file(tmp_path)
    train = open_dataset(list_root, fmt="list", split="train", scheme=path)
    assert len(train) == 8 and train.scheme.name == "my21" and train.scheme.flip == FLIP21
    assert train.scheme.relation_neighbors == knn_neighbors(train.mean_shape(), 3)
    assert train.scheme == load_scheme(path, mean_shape=train.mean_shape())
    test = open_dataset(list_root, fmt="list", split="test", scheme=train.scheme)
    names, flags = test.tag_flags()
    assert names == ("profile",) and flags[:, 0].tolist() == [0, 1, 0, 1]


def test_coco_and_imglab_readers_take_a_scheme_of_any_count(tmp_path):
    _images(tmp_path, 3)
    faces = list(_faces(3))
    coco = {"images": [{"id": i, "file_name": name, "width": 96, "height": 96} for i, (name, _, _) in enumerate(faces)],
            "annotations": [{"image_id": i, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                             "keypoints": np.concatenate([p, np.full((21, 1), 2)], 1).ravel().tolist()}
                            for i, (_, box, p) in enumerate(faces)]}
    (tmp_path / "faces_train.json").write_text(json.dumps(coco))
    boxes = "".join(
        f"<image file='{name}'><box top='{box[1]}' left='{box[0]}' width='{box[2] - box[0]}' "
        f"height='{box[3] - box[1]}'>" + "".join(f"<part name='{k:02d}' x='{x}' y='{y}'/>" for k, (x, y) in
                                                 enumerate(points)) + "</box></image>"
        for name, box, points in faces)
    (tmp_path / "faces_train.xml").write_text(f"<dataset><images>{boxes}</images></dataset>")
    scheme = scheme_from_dict(yaml.safe_load(open(_scheme_file(tmp_path))), mean_shape=TEMPLATE21)
    for fmt in ("coco", "xml"):
        ds = open_dataset(str(tmp_path), fmt=fmt, split="train", scheme=scheme)
        assert len(ds) == 3 and ds.scheme is scheme
        np.testing.assert_allclose(ds[0].landmarks, faces[0][2], atol=1e-3)


def test_point_counts_that_differ_from_the_scheme_are_named(list_root, tmp_path, synth_root):
    wrong = _scheme_file(tmp_path, name="my22", num_points=22, flip=list(FLIP21) + [21])
    with pytest.raises(DatasetError, match="21 landmarks; the scheme my22 has 22"):
        open_dataset(list_root, fmt="list", split="train", scheme=wrong)
    with pytest.raises(DatasetError, match="98 landmarks per face but the scheme my21 has 21"):
        open_dataset(synth_root, fmt="wflw", split="train",
                     scheme=scheme_from_dict(yaml.safe_load(open(_scheme_file(tmp_path))), mean_shape=TEMPLATE21))
    with pytest.raises(SchemeError, match="not an involution"):
        open_dataset(list_root, fmt="list", split="train", scheme=_scheme_file(tmp_path, flip=[1] + list(FLIP21[1:])))


def test_data_scheme_proposes_a_file_that_trains(list_root, tmp_path, capsys):
    out = str(tmp_path / "proposed.yaml")
    assert main(["data", "scheme", list_root, "--format", "list", "--name", "my21", "--out", out]) == 0
    text = open(out).read()
    assert text.startswith("# Proposed by `structalign data scheme` from the mean shape of 8 faces")
    assert "wrote" in capsys.readouterr().out
    ds = open_dataset(list_root, fmt="list", split="train", scheme=out)
    assert ds.scheme.flip == FLIP21 and ds.scheme.name == "my21"
    assert main(["data", "scheme", list_root, "--format", "list", "--name", "x", "--out", out]) == 1
    assert "exists" in capsys.readouterr().err
    assert open(out).read() == text


def test_data_check_takes_a_scheme(list_root, tmp_path):
    lines = []
    assert check(list_root, "list", out=lines.append, scheme=_scheme_file(tmp_path)) == 0
    assert any("8 faces (my21), 0 problems" in line for line in lines)
