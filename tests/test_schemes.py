"""Landmark scheme files: the shipped schemes, validation, derivations, round trips and flip proposals."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import yaml

from structalign import metrics
from structalign.data.synth import TEMPLATE
from structalign.landmarks import (SCHEME_DIR, SCHEMES, WFLW98, SchemeError, knn_neighbors, load_scheme,
                                   propose_flip, propose_scheme, resolve_scheme, scheme_from_dict, scheme_yaml)
from structalign.losses import laplacian_relations
from structalign.models import message_graph

from model_helpers import make_model


def _mirror(first: int, last: int) -> list:
    """A run of points that a horizontal flip reverses end to end: first <-> last, first + 1 <-> last - 1, ..."""
    return [(first + k, last - k) for k in range((last - first + 1) // 2)]


def _swap(left, right) -> list:
    """Two runs of points that a horizontal flip swaps, point by point in the order given."""
    return list(zip(left, right))


# The mirrored points of each published layout, run by run (docs/method.md §4.2; MMPose's `swap` fields). Points in
# no pair lie on the face's axis.
PUBLISHED_MIRRORS = {
    "wflw98": [*_mirror(0, 32),                                 # face contour
               *_swap(range(33, 38), range(46, 41, -1)),        # upper brow edges
               *_swap(range(38, 42), range(50, 46, -1)),        # lower brow edges
               *_mirror(55, 59),                                # lower nose (51-54: the nose bridge)
               *_swap(range(60, 68), (72, 71, 70, 69, 68, 75, 74, 73)),  # eyes, each from its outer corner
               *_mirror(76, 82), *_mirror(83, 87),              # outer lip, upper and lower
               *_mirror(88, 92), *_mirror(93, 95),              # inner lip, upper and lower
               (96, 97)],                                       # pupils
    "300w68": [*_mirror(0, 16),                                 # jaw
               *_swap(range(17, 22), range(26, 21, -1)),        # brows (27-30: the nose bridge)
               *_mirror(31, 35),                                # lower nose
               *_swap(range(36, 42), (45, 44, 43, 42, 47, 46)),  # eyes, each from its outer corner
               *_mirror(48, 54), *_mirror(55, 59),              # outer lip, upper and lower
               *_mirror(60, 64), *_mirror(65, 67)],             # inner lip, upper and lower
    "cofw29": [(0, 1), (2, 3), (4, 6), (5, 7),                  # brows: outer and inner ends, top, bottom
               (8, 9), (10, 11), (12, 14), (13, 15),            # eyes: outer and inner corners, top, bottom
               (16, 17), (18, 19), (22, 23)],                   # pupils, nose wings, mouth corners
}

# sha256 of the paper's list as each scheme file holds it (JSON of the YAML list): WFLW's relations.neighbors is
# 98pts_top3.txt, 300W's and COFW's graph.edges are 68pts.txt and 29pts.txt (docs/method.md §1.2). The other tables
# are derived from it, which test_graph_and_relations_are_derived_from_the_published_list checks.
PUBLISHED_LISTS = {
    "wflw98": (("relations", "neighbors"), "108b6ca9059cb86fbf44c34e596783145657de2d81d586c8ce6943f3da10fc5f"),
    "300w68": (("graph", "edges"), "b62a7b799dc3d1d060b0ee7b53b855d528dfff4e4c7bb714bb51d0358d785ea7"),
    "cofw29": (("graph", "edges"), "0a6d84b1953412a255acfa17993e2bfc1912f9aea86cc81c72a624743632fab2"),
}


def _shipped(name):
    """(the shipped scheme file's YAML mapping, the scheme loaded from it)."""
    path = os.path.join(SCHEME_DIR, f"{name}.yaml")
    with open(path) as f:
        return yaml.safe_load(f), load_scheme(path)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIRRORS))
def test_shipped_scheme_files_are_the_registered_schemes(name):
    _, scheme = _shipped(name)
    assert scheme == SCHEMES[name] and scheme.name == name


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIRRORS))
def test_flip_tables_are_the_published_layouts(name):
    """Each flip table mirrors the published layout run by run, and maps each normaliser's two point groups onto
    each other (the left eye's points onto the right eye's)."""
    _, scheme = _shipped(name)
    flip = list(range(scheme.num_points))
    for i, j in PUBLISHED_MIRRORS[name]:
        flip[i], flip[j] = j, i
    assert scheme.flip == tuple(flip)
    for groups in (scheme.ocular, scheme.pupils):
        assert [sorted(scheme.flip[i] for i in g) for g in groups] == [sorted(g) for g in reversed(groups)]


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIRRORS))
def test_graph_and_relations_are_derived_from_the_published_list(name):
    """The file holds the paper's list verbatim; the other table is read from it (WFLW: the graph is each point's
    three related points, i -> j; 300W, COFW: the relations are the graph's edges read i -> j); the message-passing
    graph is the symmetrised edges plus self loops, and the relative-location relations are each non-empty row's
    mean (docs/method.md §1.2, §1.5)."""
    spec, scheme = _shipped(name)
    (section, key), digest = PUBLISHED_LISTS[name]
    assert hashlib.sha256(json.dumps(spec[section][key]).encode()).hexdigest() == digest
    if section == "relations":
        assert all(len(set(row)) == 3 and i not in row for i, row in enumerate(scheme.relation_neighbors))
        assert scheme.edges == tuple((i, j) for i, row in enumerate(scheme.relation_neighbors) for j in row)
    else:
        assert scheme.relation_neighbors == tuple(tuple(j for a, j in scheme.edges if a == i)
                                                  for i in range(scheme.num_points))
    mask = torch.eye(scheme.num_points, dtype=torch.bool)
    for i, j in scheme.edges:
        mask[i, j] = mask[j, i] = True
    assert torch.equal(message_graph(scheme).dense_mask(), mask)
    anchor, indptr, member, weight = laplacian_relations(scheme).tensors(dtype=torch.float64)
    rows = [row for row in scheme.relation_neighbors if row]
    assert anchor.tolist() == [i for i, row in enumerate(scheme.relation_neighbors) if row]
    assert [member[a:b].tolist() for a, b in zip(indptr[:-1], indptr[1:])] == [list(row) for row in rows]
    assert weight.tolist() == [1.0 / len(row) for row in rows for _ in row]


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIRRORS))
@pytest.mark.parametrize("norm", ["inter_ocular", "inter_pupil"])
def test_nme_divides_by_the_distance_between_the_normaliser_groups(name, norm):
    _, scheme = _shipped(name)
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, scheme.num_points, 2)) * 30 + 100
    pred = target + rng.normal(size=target.shape)
    first, second = scheme.ocular if norm == "inter_ocular" else scheme.pupils
    distance = np.linalg.norm(target[:, list(first)].mean(1) - target[:, list(second)].mean(1), axis=-1)
    expected = np.linalg.norm(pred - target, axis=-1).mean(1) / distance
    np.testing.assert_allclose(metrics.per_image_nme(pred, target, scheme, norm=norm), expected, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MIRRORS))
def test_to_dict_and_yaml_round_trip(name, tmp_path):
    scheme = SCHEMES[name]
    assert scheme_from_dict(scheme.to_dict()) == scheme
    path = tmp_path / f"{name}.yaml"
    path.write_text(scheme_yaml(scheme, header="written by a test"))
    assert load_scheme(str(path)) == scheme
    assert resolve_scheme(str(path)) == scheme and resolve_scheme(scheme.to_dict()) == scheme


def _kite(**changes) -> dict:
    """A valid 6-point scheme spec, with some keys changed."""
    spec = {"name": "kite6", "num_points": 6, "flip_pairs": [[0, 1], [2, 3]],
            "normalization": {"inter_ocular": [[0], [1]]},
            "graph": {"edges": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0]]}, "relations": {"from": "graph"}}
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}


SQUARE = np.array([(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.4), (0.5, 1.5)])


def test_a_custom_scheme_with_derived_graph_and_relations():
    scheme = scheme_from_dict(_kite(graph={"from": "relations"}, relations={"knn": 2}), mean_shape=SQUARE)
    assert scheme.flip == (1, 0, 3, 2, 4, 5)
    assert scheme.relation_neighbors == knn_neighbors(SQUARE, 2)
    assert scheme.edges == tuple((i, j) for i, js in enumerate(knn_neighbors(SQUARE, 2)) for j in js)
    assert scheme.pupils == scheme.ocular == ((0,), (1,))
    explicit = scheme_from_dict(_kite())
    assert explicit.relation_neighbors == ((1,), (2,), (3,), (4,), (5,), (0,))
    assert knn_neighbors(SQUARE, 1) == ((4,), (4,), (5,), (5,), (0,), (2,))
    model = make_model(scheme, 64, arch="lgrn", backbone="resnet18", head_width=16, num_blocks=1, backbone_width=8,
                       op_backend="reference")
    assert model(torch.rand(1, 3, 64, 64))[0].shape == (1, 6, 2)
    with pytest.raises(SchemeError, match="k must be"):
        knn_neighbors(SQUARE, 6)
    with pytest.raises(SchemeError, match="NaN"):
        knn_neighbors([(0, 0), (np.nan, 1)], 1)


@pytest.mark.parametrize("changes, message", [
    ({"flip": [1, 2, 0, 3, 4, 5], "flip_pairs": None}, "not an involution: point 0 -> 1 -> 2"),
    ({"flip_pairs": [[0, 1], [1, 2]]}, "both move point 1"),
    ({"flip_pairs": None}, "exactly one of flip_pairs"),
    ({"flip_pairs": [[0, 6]]}, "flip_pairs[0][1] = 6: index out of range [0, 6)"),
    ({"graph": {"edges": [[0, 1], [1, 2], [2, 3], [3, 9]]}}, "graph.edges[3][1] = 9: index out of range"),
    ({"graph": {"edges": [[0, 1], [1, 2], [2, 3]]}}, "node(s) [4, 5] have no edge"),
    ({"graph": {"edges": [[0, 1], [2, 2]]}}, "a point paired with itself"),
    ({"graph": {"from": "relations"}, "relations": {"from": "graph"}}, "derived from the other"),
    ({"relations": {"knn": 2}}, "knn needs the training mean shape"),
    ({"relations": {"neighbors": [[1]] * 5}}, "one list per point (6)"),
    ({"normalization": {"inter_ocular": [[0], [0]]}}, "distance is always zero"),
    ({"normalization": {"inter_ocular": [[0], [1]], "inter_canthal": [[2], [3]]}}, "normalization needs"),
    ({"names": ["a", "b", "c"]}, "names must be a list of 6 strings"),
    ({"num_points": 1}, "num_points = 1"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"graph": None}, "missing key 'graph'"),
])
def test_bad_scheme_files_are_named(changes, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_kite(**changes)))
    with pytest.raises(SchemeError) as info:
        load_scheme(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_unreadable_scheme_files(tmp_path):
    with pytest.raises(SchemeError, match="does not exist"):
        load_scheme(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SchemeError, match="not valid YAML"):
        load_scheme(str(broken))
    with pytest.raises(SchemeError, match="no landmark scheme 'wflw99'"):
        resolve_scheme("wflw99")


def test_propose_flip_recovers_the_wflw_table_from_a_mirror_symmetric_mean_shape():
    assert propose_flip(TEMPLATE[:, :2]) == WFLW98.flip
    shuffled = np.random.default_rng(1).permutation(98)
    proposed = propose_flip(TEMPLATE[shuffled, :2])
    position = np.argsort(shuffled)     # position[original index] = shuffled index
    assert proposed == tuple(int(position[WFLW98.flip[shuffled[i]]]) for i in range(98))


def test_box_normalisation():
    target = np.zeros((1, 98, 2))
    target[0, :, 0] = np.linspace(10, 50, 98)     # 40 px wide
    target[0, :, 1] = np.linspace(0, 90, 98)      # 90 px high: box size sqrt(40 * 90) = 60
    pred = target + np.array([3.0, 4.0])          # 5 px off everywhere
    assert metrics.per_image_nme(pred, target, WFLW98, norm="box")[0] == pytest.approx(5 / 60)


def test_propose_scheme_writes_a_valid_file_to_review(tmp_path):
    spec, notes = propose_scheme("mine98", TEMPLATE[:, :2])
    assert scheme_from_dict(spec, mean_shape=TEMPLATE[:, :2]).flip == WFLW98.flip
    assert spec["relations"] == {"knn": 3} and "widest mirrored pair" in notes[1]
    lopsided = np.array([(0.0, 0.0), (0.2, 1.0), (3.0, 3.0)])     # nothing lies near another point's mirror image
    spec, notes = propose_scheme("three", lopsided)
    assert spec["flip_pairs"] == [] and spec["normalization"]["inter_ocular"] == [[0], [2]]
    assert "no mirrored pairs" in notes[1]
