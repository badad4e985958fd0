"""Small datasets written in the real formats for the data tests (no downloads)."""
import pytest

from structalign.data.synth import render_dataset


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A built-in WFLW-layout dataset: 16 train and 8 test faces of 160 x 160."""
    root = tmp_path_factory.mktemp("synth")
    render_dataset(str(root), 16, 8, seed=1, width=160, height=160, workers=1)
    return str(root)
