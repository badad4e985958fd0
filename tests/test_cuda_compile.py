"""The torch-free CUDA device code (csrc/cuda/*_kernels.cuh) compiles with nvcc for sm_80 and sm_90.

Each header is compiled as its own translation unit with STRUCTALIGN_INSTANTIATE_KERNELS defined, under which the
header instantiates its kernel templates for every dtype the launcher dispatches. The ATen launchers themselves are
compiled by `make check-cuda` against a CUDA build of torch.
"""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_kernels.cuh")))
NVCC = shutil.which("nvcc")


def test_every_cuda_op_has_a_torch_free_kernel_header():
    launchers = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert launchers, "no CUDA launchers in csrc/cuda"
    for launcher in launchers:
        header = launcher[: -len(".cu")] + "_kernels.cuh"
        assert header in HEADERS, f"{os.path.basename(launcher)} has no torch-free {os.path.basename(header)}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("header", HEADERS, ids=[os.path.basename(h) for h in HEADERS])
def test_kernels_compile_with_nvcc(header, arch, tmp_path):
    out = tmp_path / f"k{arch}.o"
    cmd = [NVCC, "-x", "cu", "-c", header, "-o", str(out), "-std=c++17", "-DSTRUCTALIGN_INSTANTIATE_KERNELS",
           "-I", os.path.join(ROOT, "csrc"), "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed for {header} sm_{arch}:\n{proc.stderr[-4000:]}"
    assert out.stat().st_size > 0
