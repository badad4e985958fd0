"""Build of structalign and its C++/CUDA extension `structalign._C`.

    pip install -e .                                  # the package; the extension builds on first use (cached)
    pip install -e . --no-build-isolation             # the package and the extension, compiled now

With pip's build isolation (the default) this script cannot see the environment's torch, so it installs the Python
package only, and the extension is compiled on first use into a cache (structalign/ops/extension.py). Where torch is
importable (--no-build-isolation, `setup.py build_ext`), the extension is compiled here, from the same build spec
(structalign/ops/extension.py: sources, flags, the CUDA decision, STRUCTALIGN_CUDA, TORCH_CUDA_ARCH_LIST,
STRUCTALIGN_DEBUG). STRUCTALIGN_NO_EXT=1 leaves the extension out (the Makefile's editable install, so that `make`
compiles it once, with `setup.py build_ext --inplace`, instead of twice).
torch is not an install requirement: the environment brings its own (a bare `torch` would pull a 5 GB CUDA build).
"""
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ENVIRONMENT_CHOOSES = re.compile(r"^(torch|triton|nvidia-dali-\S+)\b")  # CPU or CUDA builds: the user's choice


def _load_extension_spec():
    """structalign/ops/extension.py, loaded by path: importing the package would need torch."""
    path = os.path.join(ROOT, "structalign", "ops", "extension.py")
    spec = importlib.util.spec_from_file_location("_structalign_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nWARNING (structalign setup.py): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _install_requires() -> list:
    """requirements-cpu.txt without torch, Triton (a CUDA torch brings its own) and DALI (optional, CUDA-specific)."""
    with open(os.path.join(ROOT, "requirements-cpu.txt")) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line and not ENVIRONMENT_CHOOSES.match(line)]


def _build_options() -> dict:
    """ext_modules and cmdclass: the extension where torch is importable, else nothing (it builds on first use)."""
    if os.environ.get("STRUCTALIGN_NO_EXT") == "1":
        return {}
    if importlib.util.find_spec("torch") is None:
        print("structalign setup.py: no torch in the build environment (pip's build isolation): installing the "
              "package without compiling structalign._C, which builds on first use (`pip install -e . "
              "--no-build-isolation` compiles it now)", file=sys.stderr, flush=True)
        return {}
    spec_module = _load_extension_spec()
    cuda_home = spec_module.set_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME
    import torch
    from torch.utils import cpp_extension

    spec = spec_module.build_spec(cuda_home)
    for warning in spec.warnings:
        _warn(warning)
    kwargs = dict(include_dirs=spec.include_dirs, extra_link_args=spec.link_flags, py_limited_api=False)
    if spec.with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", spec_module.DEFAULT_CUDA_ARCHS)
        print(f"structalign setup.py: CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} with "
              f"{cpp_extension.CUDA_HOME}/bin/nvcc, torch {torch.__version__}", file=sys.stderr, flush=True)
        extension = cpp_extension.CUDAExtension(
            "structalign._C", spec.sources, extra_compile_args={"cxx": spec.cxx_flags, "nvcc": spec.nvcc_flags},
            **kwargs)
    else:
        extension = cpp_extension.CppExtension("structalign._C", spec.sources,
                                               extra_compile_args={"cxx": spec.cxx_flags}, **kwargs)
    return dict(ext_modules=[extension],
                cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})


setup(
    name="structalign",
    version="0.1.0",
    description="Structure-coherent face alignment (L-GRN) with fused graph and relative-location ops",
    packages=find_packages(include=["structalign", "structalign.*"]) + ["structalign_kernels"],
    package_dir={"structalign_kernels": "kernels"},
    package_data={"structalign": ["configs/*.yaml", "schemes/*.yaml"]},
    install_requires=_install_requires(),
    entry_points={"console_scripts": ["structalign = structalign.cli:main"]},
    python_requires=">=3.10",
    **_build_options(),
)
