"""Shared fixture of the engine tests: a small rendered copy of the built-in data (32 train, 8 test faces)."""
import pytest

NUM_TRAIN, NUM_TEST = 32, 8


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from structalign.data.synth import render_dataset

    root = tmp_path_factory.mktemp("synth")
    render_dataset(str(root), NUM_TRAIN, NUM_TEST, seed=0, width=128, height=128, workers=1)
    return str(root)
