"""Build of structalign and its C++/CUDA extension `structalign._C`.

    pip install -r requirements-cpu.txt && pip install -e . --no-build-isolation

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are compiled when the
installed torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME); a GPU is not needed to build.
STRUCTALIGN_CUDA=0 forces a CPU-only build, STRUCTALIGN_CUDA=1 makes a missing toolkit an error.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100). STRUCTALIGN_DEBUG=1 builds with -O0 -g.
"""
import glob
import os
import sysconfig

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("STRUCTALIGN_CUDA", "auto").lower()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not have:
            raise RuntimeError(
                "STRUCTALIGN_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}. "
                "Install a CUDA build of torch and set CUDA_HOME (e.g. /usr/local/cuda)."
            )
        return True
    return have


def _pip_cuda_includes() -> list:
    """CUDA headers shipped in pip wheels (nvidia/cu13/include) for toolkits that lack cuBLAS/cuSPARSE headers."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p))


def _extension():
    debug = os.environ.get("STRUCTALIGN_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + ["-fopenmp", "-fdiagnostics-color=always"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += _pip_cuda_includes()
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DSTRUCTALIGN_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "structalign._C", sources, extra_compile_args={"cxx": cxx + ["-DSTRUCTALIGN_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension("structalign._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="structalign",
    version="0.1.0",
    description="Structure-coherent face alignment (L-GRN) with fused graph and relative-location ops",
    packages=find_packages(include=["structalign", "structalign.*"]) + ["structalign_kernels"],
    package_dir={"structalign_kernels": "kernels"},
    package_data={"structalign": ["configs/*.yaml"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["structalign = structalign.cli:main"]},
    python_requires=">=3.10",
)
