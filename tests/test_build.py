"""The build: OpenMP flags come from probing the compiler (GCC / Linux clang: -fopenmp; Apple clang:
-Xpreprocessor -fopenmp with libomp), not from a hard-coded flag that breaks compilers without it."""
import importlib.util
import os
import stat
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("openmp_flags", os.path.join(ROOT, "tools", "openmp_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_compiler(tmp_path, accepts: str):
    """A compiler stand-in that succeeds only when its arguments contain `accepts` (and fails on -fopenmp alone
    unless accepts is "-fopenmp"), writing the output file like a compiler would."""
    script = tmp_path / "fake-cxx"
    script.write_text(f"""#!{sys.executable}
import sys
args = sys.argv[1:]
line = " ".join(args)
ok = {accepts!r} in line and ({accepts!r} != "-fopenmp" or "-Xpreprocessor" not in line)
if ok:
    open(args[args.index("-o") + 1], "w").close()
sys.exit(0 if ok else 1)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def test_the_compiler_in_use_gets_working_openmp_flags():
    flags = _tool().openmp_flags()
    assert flags is not None and "-fopenmp" in flags[0]  # this machine's GCC


def test_apple_clang_style_and_compilers_without_openmp(tmp_path):
    tool = _tool()
    assert tool.openmp_flags(_fake_compiler(tmp_path, "-fopenmp")) == (["-fopenmp"], ["-fopenmp"])
    assert tool.openmp_flags(_fake_compiler(tmp_path, "-lomp")) == (["-Xpreprocessor", "-fopenmp"], ["-lomp"])
    assert tool.openmp_flags(_fake_compiler(tmp_path, "never")) is None
    assert tool.openmp_flags([str(tmp_path / "no-such-compiler")]) is None

