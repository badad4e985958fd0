"""`pip install -e .` as a user types it (with pip's build isolation) in a fresh venv: without torch it installs and
the CLI says in one line what to install; with torch it installs without compiling, and the first op call on the C++
backend builds the extension into a cache (saying so), which the next process reuses.

The venv sees this test environment's installed packages (torch and the runtime requirements) through a folder of
links named by a .pth file, less structalign itself: installing them from the package index would take minutes.

    .venv/bin/python -m pytest -q tests/test_install.py
"""
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import PurePath

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REQUIREMENT = "structalign needs PyTorch >= 2.11: pip install torch (see README 'Install')"
OP_CALL = """
import sys, torch, structalign
from structalign.ops import LandmarkGraph, graph_message_passing
graph = LandmarkGraph.from_edges(5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)])
h_self, h_nbr = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
logits = torch.randn(graph.num_edges, dtype=torch.float64)
cpp = graph_message_passing(h_self, h_nbr, logits, graph, backend="cpp")
reference = graph_message_passing(h_self, h_nbr, logits, graph, backend="reference")
torch.testing.assert_close(cpp, reference, rtol=1e-12, atol=1e-12)
print(structalign.__file__)
"""


def _checkout_copy(dest) -> str:
    """The checkout's files (tracked, and new ones git does not ignore) copied to dest: no built extension."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            with open(src, "rb") as f_in, open(os.path.join(dest, rel), "wb") as f_out:
                f_out.write(f_in.read())
    return str(dest)


def _link_packages(folder, leave_out: set) -> None:
    """Links in `folder` to this environment's installed packages, less the distributions named in leave_out."""
    site = sysconfig.get_paths()["purelib"]
    skip = set()
    for dist in importlib.metadata.distributions(path=[site]):
        if dist.metadata["Name"].lower() in leave_out:
            skip |= {PurePath(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(site):
        target = os.path.join(folder, name)
        if name not in skip and not name.endswith(".pth") and not os.path.lexists(target):
            os.symlink(os.path.join(site, name), target)


def _run(cmd, env, cwd):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_plain_pip_install_e_without_then_with_torch(tmp_path):
    checkout = _checkout_copy(tmp_path / "checkout")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python, pip, cli = (str(venv / "bin" / name) for name in ("python", "pip", "structalign"))
    packages = tmp_path / "packages"
    own = {"structalign", "pip", "setuptools", "wheel"}
    _link_packages(packages, own | {"torch"})
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], None,
                     tmp_path).stdout.strip()
    with open(os.path.join(venv_site, "test-environment.pth"), "w") as f:
        f.write(f"{packages}\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_NO_BUILD_ISOLATION", "STRUCTALIGN_JIT", "TORCH_EXTENSIONS_DIR")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")

    # No torch: the install works, and the CLI names what to install in one line.
    install = _run([pip, "install", "-e", checkout], env, tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    assert _run([python, "-c", "import torch"], env, tmp_path).returncode != 0  # the venv really has no torch
    train = _run([cli, "train", "demo"], env, tmp_path)
    assert (train.returncode, train.stdout, train.stderr) == (1, "", f"{TORCH_REQUIREMENT}\n")
    predictor = _run([python, "-c", "from structalign import Predictor"], env, tmp_path)
    assert predictor.stderr.strip().splitlines()[-1] == f"ImportError: {TORCH_REQUIREMENT}"

    # With torch: the install compiles nothing; the first use of the C++ backend builds the extension, once.
    _link_packages(packages, own)
    install = _run([pip, "install", "-e", checkout], env, tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    assert not [p for p in os.listdir(os.path.join(checkout, "structalign")) if p.startswith("_C")]
    first = _run([python, "-c", OP_CALL], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == os.path.join(checkout, "structalign", "__init__.py")
    torch_version = importlib.metadata.version("torch")
    building = [line for line in first.stderr.splitlines() if "building the C++ extension" in line]
    assert len(building) == 1 and building[0].startswith(
        f"structalign: building the C++ extension for torch {torch_version} (first use, about a minute); cached in "
        f"{tmp_path / 'extensions' / 'structalign'}"), first.stderr
    again = _run([python, "-c", OP_CALL], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "building" not in again.stderr
