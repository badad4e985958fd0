"""The flags that give a C++ compiler OpenMP, found by compiling a tiny OpenMP program with each candidate.

The extension needs OpenMP for speed, not for correctness: ATen's at::parallel_for is an inline template that runs
its loop across threads only when the extension itself is compiled with OpenMP. GCC and Linux clang take -fopenmp;
Apple clang takes -Xpreprocessor -fopenmp and links libomp. A compiler that takes neither builds single-threaded
kernels (setup.py says so).

    python3 tools/openmp_flags.py [CXX]    # prints the compile flags, then the link flags, or exits 1
"""
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

CANDIDATES = ((["-fopenmp"], ["-fopenmp"]), (["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
PROGRAM = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compiler() -> list:
    """The C++ compiler setuptools will use: $CXX, else Python's configured CXX, else c++ (as an argv list)."""
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def openmp_flags(cxx=None):
    """(compile flags, link flags) of the first candidate with which cxx compiles and links an OpenMP program, or
    None when none does."""
    cxx = compiler() if cxx is None else list(cxx)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "omp.cpp")
        with open(source, "w") as f:
            f.write(PROGRAM)
        for compile_flags, link_flags in CANDIDATES:
            try:
                built = subprocess.run(cxx + compile_flags + [source, "-o", os.path.join(folder, "omp")] + link_flags,
                                       capture_output=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if built.returncode == 0:
                return compile_flags, link_flags
    return None


if __name__ == "__main__":
    found = openmp_flags(shlex.split(sys.argv[1]) if len(sys.argv) > 1 else None)
    if found is None:
        sys.exit(f"no OpenMP flags work with {' '.join(compiler())}")
    print(" ".join(found[0]))
    print(" ".join(found[1]))
