"""tools/gpu_check.py (`make gpu-check`) cannot rot, and a package the GPU machines lack fails here: its dry run runs
every step a CPU can run, in a venv holding only the GPU image's packages (.venv-image, `make image-venv`) plus the
folder of what the image lacks (.gpu-deps, `make gpu-deps`), and writes the same results.json / results.md as on a
GPU. Also: a step over its time gets SIGINT first (pytest still writes its report), one line per gpu test, how
compute-sanitizer and pytest results are read, results.md on one screen, the build check's refusal of a .so built
for another torch, the sanitizer driver's graph_conv cases, the SASS list of `make check-cuda`, and that
`make check-cuda` really skips without a CUDA toolkit."""
import json
import os
import signal
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_cuda_build  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402
import sanitize_ops  # noqa: E402

IMAGE_PYTHON = os.path.join(ROOT, ".venv-image", "bin", "python")
STATUSES = {"ok", "failed", "skipped", "timeout"}


def _env():
    """The environment of a fresh shell: the script decides TRITON_INTERPRET and PYTHONPATH itself."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}


def _image_python():
    if not os.access(IMAGE_PYTHON, os.X_OK):
        pytest.fail(f"no {IMAGE_PYTHON}: run `make image-venv gpu-deps` (`make test` does)")
    return IMAGE_PYTHON


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([_image_python(), os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--out",
                           str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    with open(out / "results.json") as f:
        result = json.load(f)
    return proc, result, out


@pytest.mark.slow
def test_dry_run_passes_with_only_the_image_packages_and_gpu_deps(dry_run):
    proc, result, out = dry_run
    steps = {s["name"]: s for s in result["steps"]}
    assert [s["name"] for s in result["steps"]] == list(gpu_check.STEPS)
    assert result["schema"] == gpu_check.SCHEMA and result["dry_run"] is True
    for step in result["steps"]:
        assert step["status"] in STATUSES and isinstance(step["seconds"], float) and step["summary"]
        assert {"command", "returncode", "log", "timeout_s", "details"} <= set(step)
    # The build check may only fail because csrc/ changed after the last `make ext`.
    assert steps["build"]["status"] == "ok" or steps["build"]["details"].get("stale"), steps["build"]
    failed = [s["name"] for s in result["steps"] if s["status"] not in ("ok", "skipped")]
    assert failed in ([], ["build"]) and proc.returncode == (1 if failed else 0), (failed, proc.stdout[-3000:])
    machine = result["machine"]
    tag = "cp%s%s" % tuple(machine["python"].split(".")[:2])
    assert machine["gpu_deps"] == os.path.join(ROOT, ".gpu-deps", tag) and "pydantic" not in machine["missing_modules"]
    assert steps["gpu_tests"]["details"]["collected"] > 0 and not steps["gpu_tests"]["details"]["errors"]
    assert steps["racecheck"]["status"] == "skipped"
    driver = steps["memcheck"]["details"]["driver_lines"]
    for op in ("graph_message_passing", "graph_conv", "relative_location_loss"):
        for backend in ("cpp", "triton"):
            assert any(line.startswith(f"{op} ({backend}):") and line.endswith(" 0 failed") for line in driver), op
    assert driver[-1].startswith("OK,") and "backends cpp,triton" in driver[-1]


@pytest.mark.slow
def test_dry_run_benchmark_has_bytes_and_copy_bandwidth(dry_run):
    _, result, _ = dry_run
    bench = result["benchmark"]
    assert bench["meta"]["copy_GBps"] > 0 and bench["meta"]["complete"]
    rows = bench["rows"]
    assert {r["op"] for r in rows} == {"graph_message_passing", "relative_location_loss"}
    assert {"eager", "compile"} <= {r["backend"] for r in rows}
    for r in rows:
        assert r["error"] is None and r["median_ms"] > 0 and r["bytes"] > 0 and r["pct_copy"] > 0
        assert r["mode"] in ("forward", "backward", "full") and r["dtype"] == "fp32" and r["batch"] == 2
    full = [r for r in rows if r["mode"] == "full" and r["op"] == "graph_message_passing"]
    # 8F + 3L + 2b at B=2, N=98, C=16 fp32 (F: one feature tensor, L: shared or per-face logits, b: bias).
    f, e = 2 * 98 * 16 * 4, 470
    assert {r["bytes"] for r in full} == {8 * f + 3 * e * 4 + 2 * 16 * 4, 8 * f + 3 * 2 * e * 4 + 2 * 16 * 4}
    assert result["targets"] and all(t["informational"] for t in result["targets"])


@pytest.mark.slow
def test_dry_run_writes_results_md_on_one_screen(dry_run):
    _, result, out = dry_run
    text = (out / "results.md").read_text()
    assert "DRY RUN on a CPU" in text and "| step | status | s | summary |" in text and "Targets at B=2" in text
    for step in gpu_check.STEPS:
        assert f"| {step} |" in text
    assert len(text.splitlines()) <= 40
    assert (out / "bench.json").exists() and "graph_message_passing" in (out / "logs" / "benchmark.log").read_text()


@pytest.mark.slow
def test_dry_run_runs_the_training_loop_fed_by_the_real_loaders(dry_run):
    _, result, out = dry_run
    step = {s["name"]: s for s in result["steps"]}["train_bench"]
    assert step["status"] == "ok", step
    rows = step["details"]["rows"]
    assert {r["section"] for r in rows} == {"loader"} and {r["steps"] for r in rows} == {6}
    assert [r["data"] for r in rows][:2] == ["device-synthetic", "reference"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "reference data" in step["summary"] and (out / "train_bench.json").exists()


def test_the_image_venv_lacks_what_gpu_deps_brings():
    """pydantic (the configs) is not in the GPU image, so not in .venv-image either: only .gpu-deps brings it, for the
    image's CPython 3.12 on x86-64 Linux and for the local python, within 64 MiB."""
    python = _image_python()
    tag = subprocess.run([python, "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"], capture_output=True,
                         text=True).stdout.strip()
    check = "import importlib.util as u; print([m for m in ('pydantic', 'nvidia', 'importlinter') if u.find_spec(m)])"
    bare = subprocess.run([python, "-c", check], env=_env(), capture_output=True, text=True)
    assert bare.stdout.strip() == "[]", bare.stdout + bare.stderr
    with_deps = subprocess.run([python, "-c", "import pydantic, pydantic_core; print(pydantic.VERSION)"],
                               env=dict(_env(), PYTHONPATH=os.path.join(ROOT, ".gpu-deps", tag)), capture_output=True,
                               text=True)
    assert with_deps.returncode == 0, with_deps.stderr
    deps = os.path.join(ROOT, ".gpu-deps")
    libraries = [n for n in os.listdir(os.path.join(deps, "cp312", "pydantic_core")) if n.endswith(".so")]
    assert libraries and all(".cpython-312-x86_64-linux-gnu." in n for n in libraries), libraries
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(deps) for f in files)
    assert size <= 64 * 2**20


# A step that writes its report on SIGINT, as pytest does, and exits with status 3.
POLITE = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('report', 'written')\n"
          "    raise SystemExit(3)")


def test_a_step_over_time_gets_sigint_then_sigkill(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE", 2)
    runner = gpu_check.Runner(str(tmp_path), 480, False, sys.executable, _env())
    res = runner.run("polite", [sys.executable, "-c", POLITE], timeout=2)
    assert res["timed_out"] and res["returncode"] == 3 and "report written" in res["output"].splitlines()[1:]
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    res = runner.run("deaf", [sys.executable, "-c", deaf], timeout=2)
    assert res["timed_out"] and res["returncode"] == -9
    step = runner.record("deaf", "ok", "finished", res)
    assert step["status"] == "timeout" and step["summary"].startswith("interrupted after 2 s")


def test_a_step_gets_sigint_when_the_check_itself_ignores_it(tmp_path, monkeypatch):
    """`nohup make gpu-check &` starts the check with SIGINT ignored; its steps must still get SIGINT (pytest writes
    its report on it), not inherit the ignoring and die by SIGKILL."""
    monkeypatch.setattr(gpu_check, "GRACE", 2)
    runner = gpu_check.Runner(str(tmp_path), 480, False, sys.executable, _env())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a non-interactive shell
    try:
        res = runner.run("polite", [sys.executable, "-c", POLITE], timeout=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert res["timed_out"] and res["returncode"] == 3, res["output"]


def test_gpu_tests_print_a_line_each_and_report_when_interrupted(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    (tmp_path / "tests" / "test_sample.py").write_text(textwrap.dedent("""\
        import time
        import pytest
        @pytest.mark.gpu
        def test_passes():
            pass
        @pytest.mark.gpu
        def test_fails():
            assert 1 == 2
        @pytest.mark.gpu
        def test_hangs():
            time.sleep(120)
        def test_not_for_gpus():
            pass
        """))
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "GRACE", 10)
    monkeypatch.setitem(gpu_check.PLAN, "gpu_tests", (8, 0, 8))
    runner = gpu_check.Runner(str(tmp_path / "out"), 480, False, sys.executable, _env(), {"have_pytest": True})
    gpu_check.step_tests(runner)
    step = runner.steps[-1]
    assert step["status"] == "timeout" and "1 passed, 1 failed" in step["summary"], step
    assert step["details"]["failures"][0]["test"].endswith("test_sample::test_fails")
    log = (tmp_path / "out" / step["log"]).read_text()
    assert "test_sample.py::test_passes PASSED" in log and "test_sample.py::test_fails FAILED" in log
    assert "test_sample.py::test_hangs" in log and "test_not_for_gpus" not in log


def test_a_so_built_for_another_torch_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text("__version__ = '2.11.0+cu130'\n")
    build = tmp_path / "build" / "temp.linux-x86_64-cpython-399"
    build.mkdir(parents=True)
    (build / "build.ninja").write_text(f"cflags = -I{site}/torch/include -I{site}/torch/include/api\n")
    (tmp_path / "structalign").mkdir()
    (tmp_path / "structalign" / "_C.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    runner = gpu_check.Runner(str(tmp_path / "out"), 480, True, sys.executable, _env(),
                              {"torch": "2.13.0+cpu", "cache_tag": "cpython-399"})
    gpu_check.step_build(runner)
    step = runner.steps[-1]
    assert step["status"] == "failed" and "built for torch 2.11.0+cu130" in step["summary"]
    assert "this python has torch 2.13.0+cpu" in step["summary"] and step["command"] is None


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["ok"] is False and all(s["status"] == "skipped" for s in result["steps"])
    assert "no CUDA device" in result["steps"][0]["summary"]


def _fake_sanitizer(tmp_path, text, rc=0):
    path = tmp_path / "compute-sanitizer"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\nexit {rc}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("text,rc,status,words", [
    ("========= COMPUTE-SANITIZER\nsanitize-driver: OK, 125 calls on cuda with backends cpp,triton in 3.0 s\n"
     "========= ERROR SUMMARY: 0 errors", 0, "ok", "0 errors"),
    ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
     "sanitize-driver: OK, 125 calls on cuda with backends cpp,triton in 3.0 s\n========= ERROR SUMMARY: 2 errors", 86,
     "failed", "2 errors"),
    ("========= COMPUTE-SANITIZER\nsanitize-driver: OK, 26 calls\n"
     "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)", 86, "failed", "1 errors, 2 warnings"),
    ("========= COMPUTE-SANITIZER\n========= Error: Target application terminated before first instrumented API "
     "call\n========= Tool execution failed", 1, "skipped", "could not attach"),
    ("sanitize-driver: SKIPPED backend cpp: backend 'cpp' cannot run graph_conv on cuda: no CUDA kernels\n"
     "sanitize-driver: SKIPPED, no backend of cpp can run on cuda", 2, "skipped", "no backend of cpp"),
    ("sanitize-driver: SKIPPED backend cpp: backend 'cpp' cannot run graph_conv on cuda: no CUDA kernels\n"
     "sanitize-driver: OK, 125 calls on cuda with backends triton in 9.0 s\n========= ERROR SUMMARY: 0 errors", 0,
     "ok", "backends triton"),
])
def test_sanitizer_outcomes_are_read_right(tmp_path, text, rc, status, words):
    runner = gpu_check.Runner(str(tmp_path / "out"), 480, False, sys.executable, _env(),
                              {"compute_sanitizer": _fake_sanitizer(tmp_path, text, rc)})
    gpu_check.step_sanitizer(runner, "memcheck")
    step = runner.steps[-1]
    assert step["status"] == status and words in step["summary"], step


def test_the_sanitizer_driver_covers_graph_conv(capsys):
    assert sanitize_ops.main(["--device", "cpu", "--backend", "cpp", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "sanitize-driver: graph_conv (cpp): 9 forward+backward calls, 0 failed" in out
    assert "sanitize-driver: OK, 26 calls on cpu with backends cpp" in out


def test_missing_pytest_is_a_clear_failure(tmp_path):
    runner = gpu_check.Runner(str(tmp_path), 480, False, sys.executable, _env(), {"have_pytest": False})
    gpu_check.step_tests(runner)
    step = runner.steps[-1]
    assert step["status"] == "failed" and "pytest is not installed" in step["summary"]


def test_junit_results_are_counted(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.a" name="test_ok" time="1.5"/>
          <testcase classname="tests.a" name="test_bad" time="0.2">
            <failure message="assert 1 == 2">x</failure></testcase>
          <testcase classname="tests.b" name="test_skip" time="0"><skipped message="no dali"/></testcase>
          <testcase classname="" name="tests.c" time="0"><error message="ImportError: PIL">y</error></testcase>
        </testsuite></testsuites>"""))
    parsed = gpu_check_report.parse_junit(str(xml))
    assert parsed["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert parsed["failures"][0] == {"test": "tests.a::test_bad", "kind": "failure", "message": "assert 1 == 2"}
    assert parsed["slowest"][0]["test"] == "tests.a::test_ok"


def test_results_md_of_a_full_gpu_run_fits_on_one_screen(tmp_path):
    rows = [{"op": "graph_message_passing", "shape": f"B={b} N=98 C={c} {d} logits={lg}", "backend": p, "mode": m,
             "batch": b, "dtype": d, "median_ms": 1.0, "bytes": 1e6, "pct_copy": 50.0, "speedup_vs_eager": 4.0,
             "speedup_vs_compile": 2.0, "error": None}
            for b in (4096, 1024, 256, 64) for c in (128, 256) for lg in ("shared", "per-face")
            for d in ("bf16", "fp32") for p in ("eager", "compile", "reference", "cpp", "triton")
            for m in ("forward", "backward", "full")]
    rows += [dict(r, op="relative_location_loss", shape=r["shape"].replace("C=", "pairs=")) for r in rows
             if "C=128" in r["shape"]]
    failures = [{"test": f"tests/ops/test_x.py::test_{i}", "kind": "failure", "message": "assert x"} for i in range(30)]
    steps = [{"name": s, "status": "ok", "seconds": 10.0, "summary": "fine " * 20,
              "details": {"failures": failures} if s == "gpu_tests" else {}} for s in gpu_check.STEPS]
    bench = {"rows": rows, "meta": {"copy_GBps": 3000.0, "complete": True}}
    result = {"dry_run": False, "started": "2026-12-05T10:00:00", "total_s": 470.0, "budget_s": 480.0, "ok": False,
              "machine": {"device": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "python": "3.12.3"},
              "checkout": {"commit": "abc"}, "steps": steps, "targets": gpu_check_report.targets(bench, False)}
    gpu_check_report.write_markdown(str(tmp_path / "results.md"), result)
    text = (tmp_path / "results.md").read_text()
    assert len(text.splitlines()) <= 40 and "Failing tests (30; all in logs/gpu_tests.log)" in text
    assert text.count("| graph_message_passing |") == 8 and "B=4096" in text and "bf16" in text


def test_arch_list_parsing():
    assert check_cuda_build.expected_archs("8.0;9.0") == ({"sm_80", "sm_90"}, set())
    assert check_cuda_build.expected_archs("9.0a 10.0+PTX") == ({"sm_90a", "sm_100"}, {"compute_100"})


def test_newest_library_is_loaded(tmp_path):
    pkg = tmp_path / "structalign"
    pkg.mkdir()
    old, new = pkg / "_C.cpython-310-x86_64-linux-gnu.so", pkg / "_C.cpython-311-x86_64-linux-gnu.so"
    new.write_bytes(b"")
    old.write_bytes(b"")
    os.utime(new, (2e9, 2e9))
    os.utime(old, (1e9, 1e9))
    assert check_cuda_build.newest_library(str(tmp_path)) == str(new)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_check_cuda_really_skips_without_a_toolkit():
    proc = subprocess.run(["make", "--no-print-directory", "check-cuda"], cwd=ROOT,
                          env=dict(_env(), CUDA_HOME="none"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "check-cuda: SKIPPED" in proc.stdout and "nothing built" in proc.stdout
    assert "setup.py" not in proc.stdout + proc.stderr and "pip" not in proc.stdout + proc.stderr
