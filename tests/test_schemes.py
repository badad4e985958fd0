"""Landmark scheme files: the shipped schemes, validation, derivations, round trips and flip proposals."""
import hashlib
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
from structalign.models import build_model, message_graph

# sha256 of each shipped scheme's tables, graph and relation tensors and NME on fixed data, computed with the
# schemes as Python tuples before they became files (commit c1105d1): the files must reproduce them exactly.
BEFORE_FILES = {
    "wflw98": "ac9c940496ac2eea2bf391108f606be0c364dfdb6bd3f3d12fb7beddd7ba0b98",
    "300w68": "16a0b493f083fcfca6d990f4e3d8b94911a018dea670f3205e64b64f0274a0c3",
    "cofw29": "9946648d11eaf6441d848b03ef80cf51a77ac3643e7135a346636eed648185c3",
}


def _fingerprint(scheme) -> str:
    parts = [scheme.num_points, tuple(scheme.flip), scheme.ocular, scheme.pupils, tuple(scheme.edges),
             tuple(scheme.relation_neighbors)]
    parts += [t.tolist() for t in message_graph(scheme).tensors()]
    parts += [t.tolist() for t in laplacian_relations(scheme).tensors(dtype=torch.float64)]
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, scheme.num_points, 2)) * 30 + 100
    pred = target + rng.normal(size=target.shape)
    for norm in ("inter_ocular", "inter_pupil"):
        parts.append(np.round(metrics.per_image_nme(pred, target, scheme, norm=norm), 12).tolist())
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(BEFORE_FILES))
def test_shipped_scheme_files_reproduce_the_former_tables(name):
    scheme = load_scheme(os.path.join(SCHEME_DIR, f"{name}.yaml"))
    assert scheme == SCHEMES[name] and scheme.name == name
    assert _fingerprint(scheme) == BEFORE_FILES[name]


@pytest.mark.parametrize("name", sorted(BEFORE_FILES))
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
    model = build_model("lgrn", "resnet18", scheme, image_size=64, head_width=16, num_blocks=1, backbone_width=8,
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
