"""Find the CUDA toolkit to build with (no torch needed): prints its root and exits 0, or prints nothing and exits 1.

    python3 tools/cuda_home.py [--nvcc]

A toolkit root is a folder with bin/nvcc and include/cuda_runtime.h. Candidates, in order: $CUDA_HOME, $CUDA_PATH,
the folder of the `nvcc` on PATH (following symlinks and one-line wrapper scripts such as `exec /usr/local/cuda-13.0/
bin/nvcc "$@"`, which make torch guess /usr/local), /usr/local/cuda, then /usr/local/cuda-* (newest first).
CUDA_HOME=none means "no toolkit" (a CPU-only build; how tests check that `make check-cuda` skips).
Used by the Makefile (`make check-cuda` skips when nothing is found), setup.py and tools/gpu_check.py.
"""
import glob
import os
import re
import shutil
import sys


def is_toolkit(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _wrapped_nvcc(path: str) -> str | None:
    """The real nvcc behind a small shell wrapper (`exec /x/bin/nvcc "$@"`), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"(/\S+/bin/nvcc)\b", head)
    return match.group(1).decode() if match else None


def nvcc_roots() -> list:
    """Toolkit roots implied by the nvcc on PATH."""
    roots = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (nvcc, os.path.realpath(nvcc), _wrapped_nvcc(os.path.realpath(nvcc))):
            if path:
                roots.append(os.path.dirname(os.path.dirname(os.path.realpath(path))))
    return roots


def candidates() -> list:
    found = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")] + nvcc_roots() + ["/usr/local/cuda"]
    found += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    seen, out = set(), []
    for c in found:
        if c and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def find_cuda_home() -> str | None:
    """The first candidate that is a real toolkit root, or None."""
    if os.environ.get("CUDA_HOME", "").lower() == "none":
        return None
    for root in candidates():
        if is_toolkit(root):
            return root
    return None


def main(argv) -> int:
    root = find_cuda_home()
    if root is None:
        return 1
    print(os.path.join(root, "bin", "nvcc") if "--nvcc" in argv else root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
