"""tools/gpu_check.py (`make gpu-check`) cannot rot: its --dry-run runs every step that a CPU can run (the build
check, collecting the gpu tests, the sanitizer driver on CPU tensors, the op benchmark at a tiny size) and writes the
same results.json / results.md as on a GPU. Also: how it reads compute-sanitizer and pytest results, the SASS list of `make check-cuda`, and that `make check-cuda` really skips without a CUDA toolkit."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_cuda_build  # noqa: E402
import gpu_check  # noqa: E402

STATUSES = {"ok", "failed", "skipped", "timeout"}


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as on a fresh shell: the script decides what it needs
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    with open(out / "results.json") as f:
        result = json.load(f)
    return proc, result, out


@pytest.mark.slow
def test_dry_run_records_every_step(dry_run):
    proc, result, out = dry_run
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert result["schema"] == gpu_check.SCHEMA and result["dry_run"] is True
    assert [s["name"] for s in result["steps"]] == list(gpu_check.STEPS)
    for step in result["steps"]:
        assert step["status"] in STATUSES and isinstance(step["seconds"], float) and step["summary"]
        assert {"command", "returncode", "log", "timeout_s", "details"} <= set(step)
    steps = {s["name"]: s for s in result["steps"]}
    # The build check may only fail because csrc/ changed after the last `make ext`.
    assert steps["build"]["status"] == "ok" or steps["build"]["details"].get("stale"), steps["build"]
    assert steps["gpu_tests"]["status"] == "ok", steps["gpu_tests"]
    assert steps["gpu_tests"]["details"]["collected"] > 0
    assert steps["memcheck"]["status"] == "ok", steps["memcheck"]
    assert "sanitize-driver: OK" in steps["memcheck"]["summary"]
    assert steps["racecheck"]["status"] == "skipped"
    assert steps["benchmark"]["status"] == "ok", steps["benchmark"]
    assert result["machine"]["torch"] and result["machine"]["cpu_count"] >= 1
    assert result["total_s"] < 300


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
    assert all(t["informational"] for t in result["targets"])


@pytest.mark.slow
def test_dry_run_writes_the_markdown_table(dry_run):
    _, result, out = dry_run
    text = (out / "results.md").read_text()
    assert "Dry run on a CPU" in text and "| step | status | seconds | summary |" in text
    assert "## Ops, forward + backward" in text and "graph_message_passing" in text
    for step in gpu_check.STEPS:
        assert f"| {step} |" in text
    assert (out / "bench.json").exists() and (out / "logs" / "benchmark.log").exists()


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
    ("========= COMPUTE-SANITIZER\nsanitize-driver: OK, 95 calls on cuda with backend cpp in 3.0 s\n"
     "========= ERROR SUMMARY: 0 errors", 0, "ok", "0 errors"),
    ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
     "sanitize-driver: OK, 95 calls on cuda with backend cpp in 3.0 s\n========= ERROR SUMMARY: 2 errors", 86,
     "failed", "2 errors"),
    ("========= COMPUTE-SANITIZER\nsanitize-driver: OK, 95 calls\n"
     "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)", 86, "failed", "1 errors"),
    ("========= COMPUTE-SANITIZER\n========= Error: Target application terminated before first instrumented API "
     "call\n========= Tool execution failed", 1, "skipped", "could not attach"),
    ("sanitize-driver: SKIPPED, backend cpp cannot run ['graph_message_passing'] on cuda: no CUDA kernels", 2,
     "skipped", "cannot run"),
])
def test_sanitizer_outcomes_are_read_right(tmp_path, text, rc, status, words):
    runner = gpu_check.Runner(str(tmp_path / "out"), 480, False, sys.executable)
    info = {"compute_sanitizer": _fake_sanitizer(tmp_path, text, rc)}
    gpu_check.step_sanitizer(runner, _env(), info, "memcheck")
    step = runner.steps[-1]
    assert step["status"] == status and words in step["summary"], step


def test_missing_pytest_is_a_clear_failure(tmp_path):
    runner = gpu_check.Runner(str(tmp_path), 480, False, sys.executable)
    gpu_check.step_tests(runner, _env(), {"have_pytest": False, "have_hypothesis": False})
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
    parsed = gpu_check.parse_junit(str(xml))
    assert parsed["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert parsed["failures"][0] == {"test": "tests.a::test_bad", "kind": "failure", "message": "assert 1 == 2"}
    assert parsed["slowest"][0]["test"] == "tests.a::test_ok"


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


@pytest.mark.slow
def test_dry_run_runs_the_training_loop_benchmark(dry_run):
    _, result, out = dry_run
    step = {s["name"]: s for s in result["steps"]}["train_bench"]
    assert step["status"] == "ok", step
    rows = step["details"]["rows"]
    assert [r["section"] for r in rows] == ["loop"] and rows[0]["images_per_s"] > 0 and rows[0]["steps"] == 6
    assert "img/s" in step["summary"] and (out / "train_bench.json").exists()
