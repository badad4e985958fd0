"""The torch-free CUDA device code (csrc/cuda/*_kernels.cuh) compiles with nvcc for sm_80 and sm_90, without
local-memory spills, and the forward of graph_message_passing has the shape the design promises.

Each header is compiled as its own translation unit with STRUCTALIGN_INSTANTIATE_KERNELS defined, under which the
header instantiates its kernel templates (and host-side launch planners) for every dtype the launcher dispatches,
with the flags torch's CUDAExtension passes (no half conversions / operators). ptxas' resource usage (registers,
stack frame, spills) is read per kernel and every kernel must be spill-free: they are all on the hot path (a failure
lists every kernel's usage). The ATen launchers themselves are compiled by `make check-cuda` against a CUDA build of
torch.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_kernels.cuh")))
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
TORCH_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3"]
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def nvcc(header, arch, out, *extra):
    cmd = [NVCC, "-x", "cu", header, "-o", str(out), "-std=c++17", "-DSTRUCTALIGN_INSTANTIATE_KERNELS", "-I",
           os.path.join(ROOT, "csrc"), *TORCH_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed for {header} sm_{arch}:\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def resource_usage(ptxas_output):
    """{kernel: (registers, stack bytes, spill store bytes, spill load bytes)} from nvcc --resource-usage."""
    usage, name = {}, None
    for line in ptxas_output.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            usage[name] = [None, int(m.group(1)), int(m.group(2)), int(m.group(3))]
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            usage[name][0] = int(m.group(1))
    return usage


def short_names(mangled):
    """{mangled: readable} kernel names (c++filt when present, without namespaces and argument lists)."""
    if not shutil.which("c++filt"):
        return {m: m for m in mangled}
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    return {m: re.sub(r"structalign::\w+::|\(.*", "", d) for m, d in zip(mangled, out)}


def test_every_cuda_op_has_a_torch_free_kernel_header():
    launchers = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert launchers, "no CUDA launchers in csrc/cuda"
    for launcher in launchers:
        header = launcher[: -len(".cu")] + "_kernels.cuh"
        assert header in HEADERS, f"{os.path.basename(launcher)} has no torch-free {os.path.basename(header)}"


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("header", HEADERS, ids=[os.path.basename(h) for h in HEADERS])
def test_kernels_compile_without_spills(header, arch, tmp_path):
    out = tmp_path / f"k{arch}.o"
    usage = resource_usage(nvcc(header, arch, out, "-c", "--resource-usage"))
    assert out.stat().st_size > 0
    assert usage, "ptxas reported no kernel"
    names = short_names(list(usage))
    unreported = [names[k] for k, v in usage.items() if v[0] is None]
    assert not unreported, f"ptxas gave no register count for {unreported}"
    table = "\n".join(f"  {names[name]:64s} {regs:4d} regs  {stack:4d} B stack  {stores}/{loads} B spilled"
                      for name, (regs, stack, stores, loads) in sorted(usage.items(), key=lambda kv: names[kv[0]]))
    spilled = sorted(names[k] for k, v in usage.items() if v[1] or v[2] or v[3])
    assert not spilled, (f"kernels with local memory (stack / spills) on sm_{arch}: {spilled}\n"
                         f"{os.path.basename(header)} sm_{arch}: registers, stack bytes, spill stores / loads\n{table}")


def ptx_functions(ptx):
    """{entry name: body} of a PTX module."""
    return {m.group(1): m.group(2) for m in re.finditer(r"\.entry (\w+)\((.*?)\n}\n", ptx, re.S)}


@needs_nvcc
def test_gmp_forward_computes_the_softmax_once_per_edge_and_moves_16_byte_vectors(tmp_path):
    """In the vectorised bf16 / fp32 forwards every exponential comes before the block barrier (the per-row softmax
    phase, one exponential per edge), none in the per-channel phase after it; h_nbr, h_self and bias are read with
    16-byte read-only loads, the output written with 16-byte stores."""
    header = os.path.join(ROOT, "csrc", "cuda", "graph_message_passing_kernels.cuh")
    out = tmp_path / "gmp.ptx"
    nvcc(header, "90", out, "-ptx")
    functions = ptx_functions(out.read_text())
    for dtype, vec in (("13__nv_bfloat16", 8), ("f", 4)):
        body = next(b for n, b in functions.items() if re.search(rf"fwd_kernelI{dtype}Li{vec}E", n))
        before, barrier, after = body.partition("bar.sync")
        assert barrier, "no block barrier in the forward"
        assert "ex2.approx" in before and "ex2.approx" not in after, "exponentials after the softmax phase"
        assert "ld.global.nc.v4" in body and "st.global.v4" in after
        assert "ld.shared.v4" in after, "the staged h_nbr rows are not read as 16-byte vectors"
