"""Build of structalign and its C++/CUDA extension `structalign._C`.

    pip install -r requirements-cpu.txt && pip install -e . --no-build-isolation

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are compiled when the
installed torch is a CUDA build and a CUDA toolkit is found (tools/cuda_home.py: CUDA_HOME, CUDA_PATH, the nvcc on
PATH, /usr/local/cuda); a GPU is not needed to build. A CUDA build of torch with no toolkit builds the CPU kernels only
and says so loudly. STRUCTALIGN_CUDA=0 forces a CPU-only build, STRUCTALIGN_CUDA=1 makes a missing toolkit an error.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100). STRUCTALIGN_DEBUG=1 builds with -O0 -g.
STRUCTALIGN_NO_EXT=1 leaves the extension out (the Makefile's editable install, so that `make` compiles it once, with
`setup.py build_ext --inplace`, instead of twice).
"""
import glob
import importlib.util
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _tool(name: str):
    """The module tools/<name>.py, or None in an sdist without tools/."""
    path = os.path.join(ROOT, "tools", f"{name}.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_structalign_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_cuda_home():
    """A CUDA toolkit root (bin/nvcc and include/cuda_runtime.h) or None, found by tools/cuda_home.py."""
    tool = _tool("cuda_home")
    return "torch" if tool is None else tool.find_cuda_home()  # without tools/: torch's own guess


# Before torch.utils.cpp_extension reads CUDA_HOME (it guesses /usr/local behind an nvcc wrapper script).
_CUDA_HOME = _find_cuda_home()
if _CUDA_HOME not in (None, "torch"):
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if _CUDA_HOME == "torch":
    _CUDA_HOME = cpp_extension.CUDA_HOME if cpp_extension.CUDA_HOME and os.path.isfile(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) else None


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nWARNING (structalign setup.py): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _want_cuda() -> bool:
    flag = os.environ.get("STRUCTALIGN_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    home = _CUDA_HOME if torch.version.cuda is not None else None
    if torch.version.cuda is not None:
        cpp_extension.CUDA_HOME = home
    have = torch.version.cuda is not None and home is not None
    if flag in ("1", "true", "yes"):
        if not have:
            raise RuntimeError(
                "STRUCTALIGN_CUDA=1 but no CUDA build is possible: "
                f"torch {torch.__version__} (torch.version.cuda={torch.version.cuda!r}), CUDA toolkit={home!r}. "
                "Install a CUDA build of torch and a CUDA toolkit (nvcc), and set CUDA_HOME (e.g. /usr/local/cuda)."
            )
        return True
    if torch.version.cuda is not None and home is None:
        _warn(
            f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no CUDA toolkit was found "
            "(no nvcc in CUDA_HOME, CUDA_PATH, on PATH or in /usr/local/cuda).\n"
            "Only the CPU kernels of structalign._C are built: backend='cpp' cannot run on CUDA tensors, and "
            "backend='auto' sends CUDA tensors to the Triton kernels instead.\n"
            f"Install the CUDA {torch.version.cuda.split('.')[0]} toolkit and set CUDA_HOME to build the CUDA "
            "kernels; STRUCTALIGN_CUDA=0 builds CPU-only without this warning."
        )
    return have


def _pip_cuda_includes() -> list:
    """CUDA headers shipped in pip wheels (nvidia/cu13/include) when the toolkit lacks the cuBLAS/cuSPARSE headers
    that torch's CUDA headers include (a minimal toolkit); none with a full toolkit, whose own headers must win."""
    toolkit_include = os.path.join(cpp_extension.CUDA_HOME or "", "include")
    if all(os.path.isfile(os.path.join(toolkit_include, h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    sites = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))}
    return sorted({p for site in sites for p in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                   if os.path.isdir(p)})


def _extension():
    debug = os.environ.get("STRUCTALIGN_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    tool = _tool("openmp_flags")
    openmp = tool.openmp_flags() if tool is not None else None
    if openmp is None:
        _warn("the C++ compiler takes no OpenMP flags (tools/openmp_flags.py): the CPU kernels will run on one thread")
        openmp = ([], [])
    cxx = opt + openmp[0] + ["-fdiagnostics-color=always"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=openmp[1],
        py_limited_api=False,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"structalign setup.py: CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} with "
              f"{cpp_extension.CUDA_HOME}/bin/nvcc, torch {torch.__version__}", file=sys.stderr, flush=True)
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
    package_data={"structalign": ["configs/*.yaml", "schemes/*.yaml"]},
    ext_modules=[] if os.environ.get("STRUCTALIGN_NO_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["structalign = structalign.cli:main"]},
    python_requires=">=3.10",
)
