"""How the C++/CUDA extension structalign._C is built: the one build spec that setup.py compiles ahead of time and
that `build_just_in_time` compiles on first use where the package was installed without it (pip's build isolation
hides torch from setup.py, so a plain `pip install -e .` installs the Python package only).

Importing this module needs no torch, and setup.py loads it by path, without importing the structalign package.
The sources live in the checkout (csrc/, tools/), beside the package folder.

Settings read by both builds: STRUCTALIGN_CUDA=0 forces a CPU-only build, STRUCTALIGN_CUDA=1 makes a missing CUDA
toolkit an error (default: CUDA kernels when torch is a CUDA build and a toolkit is found by tools/cuda_home.py; a GPU
is not needed to build); TORCH_CUDA_ARCH_LIST (default "8.0;9.0", or the visible GPUs' for the build on first use);
STRUCTALIGN_DEBUG=1 builds with -O0 -g.
The just-in-time build goes to $TORCH_EXTENSIONS_DIR/structalign, else $XDG_CACHE_HOME/structalign or
~/.cache/structalign, one folder per Python, torch and checkout; ninja rebuilds what changed. STRUCTALIGN_JIT=0 turns
it off (the ops then run on the reference and Triton backends).
"""
import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass, field

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100
CPU_SOURCE_PATTERNS = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCE_PATTERN = "csrc/cuda/*.cu"


@dataclass
class BuildSpec:
    """What to compile: sources relative to CHECKOUT, include folders, compiler and linker flags, and whether the
    CUDA kernels are in; `warnings` are what the caller should tell the user (OpenMP or CUDA toolkit missing)."""

    sources: list
    include_dirs: list
    cxx_flags: list
    link_flags: list
    nvcc_flags: list = field(default_factory=list)
    with_cuda: bool = False
    warnings: list = field(default_factory=list)


def _tool(name: str):
    """The module tools/<name>.py of the checkout, or None where there is no tools/ (an sdist)."""
    path = os.path.join(CHECKOUT, "tools", f"{name}.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_structalign_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_present() -> bool:
    """True when the C++ sources are beside the package (a checkout or an editable install; a wheel has none)."""
    return os.path.isfile(os.path.join(CHECKOUT, "csrc", "structalign.cpp"))


def set_cuda_home() -> str | None:
    """The CUDA toolkit to compile with (tools/cuda_home.py), exported as CUDA_HOME, or None ("torch": no tools/,
    torch's own guess). Call it before importing torch.utils.cpp_extension, which reads CUDA_HOME at import and guesses
    /usr/local behind an nvcc wrapper script."""
    tool = _tool("cuda_home")
    if tool is None:
        return "torch"
    home = tool.find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
    return home


def _want_cuda(cuda_home, warnings: list) -> bool:
    """Whether to compile the CUDA kernels (imports torch); points torch.utils.cpp_extension at the toolkit."""
    import torch
    from torch.utils import cpp_extension

    if cuda_home == "torch":
        cuda_home = cpp_extension.CUDA_HOME if cpp_extension.CUDA_HOME and os.path.isfile(
            os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) else None
    flag = os.environ.get("STRUCTALIGN_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    home = cuda_home if torch.version.cuda is not None else None
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
        warnings.append(
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
    import torch
    from torch.utils import cpp_extension

    toolkit_include = os.path.join(cpp_extension.CUDA_HOME or "", "include")
    if all(os.path.isfile(os.path.join(toolkit_include, h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    sites = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))}
    return sorted({p for site in sites for p in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                   if os.path.isdir(p)})


def build_spec(cuda_home) -> BuildSpec:
    """The build of structalign._C for the installed torch (imports it); cuda_home is set_cuda_home()'s answer."""
    debug = os.environ.get("STRUCTALIGN_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(p for pattern in CPU_SOURCE_PATTERNS for p in glob.glob(pattern, root_dir=CHECKOUT))
    warnings = []
    tool = _tool("openmp_flags")
    openmp = tool.openmp_flags() if tool is not None else None
    if openmp is None:
        warnings.append("the C++ compiler takes no OpenMP flags (tools/openmp_flags.py): the CPU kernels will run on "
                        "one thread")
        openmp = ([], [])
    spec = BuildSpec(sources=sources, include_dirs=[os.path.join(CHECKOUT, "csrc")],
                     cxx_flags=opt + openmp[0] + ["-fdiagnostics-color=always"], link_flags=openmp[1],
                     warnings=warnings)
    if _want_cuda(cuda_home, warnings):
        spec.with_cuda = True
        spec.sources += sorted(glob.glob(CUDA_SOURCE_PATTERN, root_dir=CHECKOUT))
        spec.include_dirs += _pip_cuda_includes()
        spec.cxx_flags += ["-DSTRUCTALIGN_WITH_CUDA"]
        spec.nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DSTRUCTALIGN_WITH_CUDA"]
    return spec


def cache_dir() -> str:
    """The just-in-time build folder for this Python, torch and checkout (imports torch)."""
    import torch

    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = os.path.join(base, "structalign") if base else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "structalign")
    checkout = hashlib.sha256(CHECKOUT.encode()).hexdigest()[:10]
    return os.path.join(base, f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{checkout}")


def _fingerprint(spec: BuildSpec) -> str:
    """A digest of every file under csrc/ (sources and headers), the flags and the CUDA arch list."""
    digest = hashlib.sha256(repr((spec.sources, spec.include_dirs, spec.cxx_flags, spec.link_flags, spec.nvcc_flags,
                                  os.environ.get("TORCH_CUDA_ARCH_LIST"))).encode())
    for path in sorted(glob.glob("csrc/**/*", root_dir=CHECKOUT, recursive=True)):
        full = os.path.join(CHECKOUT, path)
        if os.path.isfile(full):
            digest.update(path.encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _unique_names(sources: list, folder: str) -> list:
    """One-line files in folder/sources that #include each source, named after its path under csrc/ (cpu__x.cpp):
    torch's just-in-time build names each object after its source's file name alone, and csrc/x.cpp and
    csrc/cpu/x.cpp would collide. A file is rewritten only when its line changes, so ninja rebuilds only what did."""
    os.makedirs(os.path.join(folder, "sources"), exist_ok=True)
    paths = []
    for source in sources:
        path = os.path.join(folder, "sources", os.path.relpath(source, "csrc").replace(os.sep, "__"))
        line = f'#include "{os.path.join(CHECKOUT, source)}"\n'
        try:
            with open(path) as f:
                same = f.read() == line
        except OSError:
            same = False
        if not same:
            with open(path, "w") as f:
                f.write(line)
        paths.append(path)
    return paths


@contextmanager
def _cuda_arch_list(with_cuda: bool):
    """TORCH_CUDA_ARCH_LIST for the body: as set, else torch's default (the visible GPUs), else DEFAULT_CUDA_ARCHS
    where no GPU is visible."""
    import torch

    if not with_cuda or "TORCH_CUDA_ARCH_LIST" in os.environ or torch.cuda.is_available():
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


def build_just_in_time() -> str | None:
    """Compile structalign._C into cache_dir() (ninja: only what changed) and load it, which registers
    torch.ops.structalign.*; None on success, else why not, in one line. Says so on stderr before a compile."""
    if os.environ.get("STRUCTALIGN_JIT", "1") == "0":
        return "it is not built, and STRUCTALIGN_JIT=0 turns off its build on first use"
    if not sources_present():
        return (f"it is not built, and its C++ sources are not beside the package (no {CHECKOUT}/csrc): install "
                "structalign from a checkout with `pip install -e .`")
    cuda_home = set_cuda_home()
    import torch
    from torch.utils import cpp_extension

    try:
        spec = build_spec(cuda_home)
    except RuntimeError as exc:
        return str(exc)
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    stamp_path = os.path.join(folder, "sources.sha256")
    with _cuda_arch_list(spec.with_cuda):
        fingerprint = _fingerprint(spec)
        try:
            with open(stamp_path) as f:
                current = f.read().strip() == fingerprint
        except OSError:
            current = False
        if not current:
            for warning in spec.warnings:
                print(f"structalign: {warning}", file=sys.stderr)
            took = "a few minutes with the CUDA kernels" if spec.with_cuda else "about a minute"
            print(f"structalign: building the C++ extension for torch {torch.__version__} (first use, {took}); "
                  f"cached in {folder}", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name="_C", sources=_unique_names(spec.sources, folder), extra_cflags=spec.cxx_flags,
                extra_cuda_cflags=spec.nvcc_flags, extra_ldflags=spec.link_flags,
                extra_include_paths=spec.include_dirs, build_directory=folder, with_cuda=spec.with_cuda,
                is_python_module=False)
        except (RuntimeError, OSError) as exc:
            log = os.path.join(folder, "build-error.log")
            with open(log, "w") as f:
                f.write(f"{exc}\n")
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = first if len(first) <= 160 else first[:157] + "..."
            return f"its build on first use failed ({first}); the whole output is in {log}"
    if not current:
        with open(stamp_path, "w") as f:
            f.write(fingerprint + "\n")
    return None
