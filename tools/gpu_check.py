"""The whole GPU path in one short run: build, gpu tests, compute-sanitizer, op benchmark -> one JSON + one table.

    python3 tools/gpu_check.py --out DIR              # on a GPU machine (make gpu-check OUT=DIR), <= 8 minutes
    python3 tools/gpu_check.py --out DIR --dry-run    # every step that can run on a CPU (run by `make test`)

Made for a GPU machine set up by others, from a bare checkout, on that machine's own python3 and torch: nothing is
installed, no virtual environment is made, no network is used. Each step is timed, recorded and given a share of
the time budget (--budget, 480 s); a failing step is recorded and the next one runs:

  build      `python3 setup.py build_ext --inplace` with STRUCTALIGN_CUDA=1, TORCH_CUDA_ARCH_LIST of the local GPU
             (torch.cuda.get_device_capability), MAX_JOBS = the core count, CUDA_HOME found by tools/cuda_home.py
             (never pip, so never build isolation); then tools/check_cuda_build.py loads the .so, checks that every
             op has a CUDA kernel and lists its SASS architectures.
             Dry run: checks that structalign/_C*.so is current (`ninja -n` in the in-place build folder finds no
             work and the .so is newer than the objects; modification times of csrc/ without a ninja folder).
  gpu_tests  `python3 -m pytest -m gpu` (junit XML in DIR/gpu-tests.xml). Without pytest this step fails and says
             so; test modules that need what the machine lacks (hypothesis, DALI) skip themselves.
             Dry run: `pytest -m gpu --collect-only`.
  memcheck   `compute-sanitizer --tool memcheck python3 tools/sanitize_ops.py` (a small case of every op, forward +
  racecheck  backward, backend cpp), and the same with --tool racecheck (the driver's --quick set of cases); skipped
             with the reason when the tool is absent or cannot attach. Dry run: the driver on CPU tensors (memcheck),
             racecheck skipped.
  benchmark  benchmarks/ops.py on the GPU: eager / reference / compile / cpp / triton, B = 4096, 1024, 256, 64 (in
             that order, so a cut-short run still has the targets), C = 128 and 256, bf16 and fp32, with the
             unavoidable bytes and % of the copy bandwidth measured in the same run. Dry run: B = 2, C = 16, fp32,
             --quick, on the CPU.
  head_bench benchmarks/head.py (issue 15): the L-GRN head's forward + backward with the fused graph_conv layer and
             today's unfused layer against its GEMMs alone (the floor), B = 1024 and 4096, bf16: the non-GEMM share.
             Dry run: B = 2, fp32, one rep, on the CPU.
  train_bench  benchmarks/train.py --sections loop --steps 200: images/s and data-wait share of the training loop
             (the paper's ResNet-34 L-GRN, 256 px, bf16, 256 images per GPU; GPU-resident synthetic batches, and DALI
             where installed) against the 5000 images/s target. Dry run: the tiny case, 6 steps, on the CPU.

Writes DIR/results.json (schema "structalign-gpu-check/1", described in README.md's "GPU check" section),
DIR/results.md (the tables to paste into benchmarks/RESULTS.md, device named), DIR/logs/<step>.log, DIR/bench.json.
Exit status: 0 when no step failed or timed out (skipped steps are allowed), 1 otherwise, 2 when there is no GPU
and --dry-run was not given.
"""
import argparse
import datetime
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)

from cuda_home import find_cuda_home  # noqa: E402

SCHEMA = "structalign-gpu-check/1"
BUILD_LOCK = "/tmp/structalign-build.lock"
STEPS = ("build", "gpu_tests", "memcheck", "racecheck", "benchmark", "head_bench", "train_bench")
# Seconds: the most a step may take, and what is kept back for each later step when an earlier one runs long.
CAPS = {"build": 240, "gpu_tests": 210, "memcheck": 60, "racecheck": 60, "benchmark": 180, "head_bench": 60,
        "train_bench": 120}
RESERVE = {"build": 0, "gpu_tests": 60, "memcheck": 30, "racecheck": 30, "benchmark": 100, "head_bench": 30,
           "train_bench": 60}
DRY_CAPS = {"build": 60, "gpu_tests": 240, "memcheck": 240, "racecheck": 60, "benchmark": 300, "head_bench": 120,
            "train_bench": 120}
TARGETS = {"pct_copy": 60.0, "speedup_vs_eager": 3.0, "speedup_vs_compile": 1.5}
ATTACH_FAILURES = ("Target application terminated before first instrumented API call", "Unable to",
                   "not supported", "No attachable process", "Internal Sanitizer Error", "Failed to initialize",
                   "Device not supported", "could not be loaded", "Error: Failed", "permission")

PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count()}
def version(dist):
    try:
        return md.version(dist)
    except Exception:
        return None
for mod, dist in (("pytest", "pytest"), ("hypothesis", "hypothesis"), ("setuptools", "setuptools"),
                  ("ninja", "ninja"), ("numpy", "numpy"), ("PIL", "pillow"), ("nvidia.dali", None),
                  ("triton", "triton"), ("scipy", "scipy"), ("yaml", "pyyaml"), ("h5py", "h5py"),
                  ("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("matplotlib", "matplotlib")):
    try:
        found = importlib.util.find_spec(mod) is not None
    except Exception:
        found = False
    info["have_" + mod.replace(".", "_").lower()] = found
    if dist:
        info[dist + "_version"] = version(dist) if found else None
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        props = torch.cuda.get_device_properties(0)
        info["device_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
print("PROBE" + json.dumps(info))
"""


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Runner:
    """Runs the steps against one time budget and keeps their records."""

    def __init__(self, out: str, budget: float, dry_run: bool, python: str):
        self.out, self.budget, self.dry_run, self.python = out, budget, dry_run, python
        self.start = time.monotonic()
        self.steps = []
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def timeout_for(self, name: str) -> float:
        caps = DRY_CAPS if self.dry_run else CAPS
        if self.dry_run:
            return caps[name]
        later = sum(RESERVE[s] for s in STEPS[STEPS.index(name) + 1:])
        return min(caps[name], self.remaining() - later)

    def run(self, name: str, cmd: list, env: dict, timeout: float, log_name: str | None = None) -> dict:
        """Run cmd in its own process group, output to logs/<name>.log; kill the group on timeout."""
        self.last_timeout = round(timeout, 1)
        log_rel = os.path.join("logs", f"{log_name or name}.log")
        log_path = os.path.join(self.out, log_rel)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                rc = proc.returncode
        with open(log_path, errors="replace") as f:
            text = f.read()
        return {"returncode": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1),
                "output": text, "log": log_rel, "command": cmd}

    def record(self, name: str, status: str, summary: str, seconds: float = 0.0, **fields) -> dict:
        step = {"name": name, "status": status, "seconds": round(seconds, 1), "summary": summary, "command": None,
                "returncode": None, "log": None, "timeout_s": None, "details": {}}
        step.update(fields)
        if step["command"] is not None and step["timeout_s"] is None:
            step["timeout_s"] = getattr(self, "last_timeout", None)
        self.steps.append(step)
        mark = {"ok": "ok  ", "failed": "FAIL", "timeout": "TIME", "skipped": "skip"}.get(status, status)
        print(f"[gpu-check] {mark} {name:<10} {seconds:6.1f} s  {summary}", flush=True)
        return step


def tail(text: str, chars: int = 2500) -> str:
    return text[-chars:] if len(text) > chars else text


def probe(python: str, env: dict) -> dict:
    proc = subprocess.run([python, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    return {"probe_error": tail(proc.stdout + proc.stderr, 1500)}


def machine_extras(info: dict) -> None:
    nvcc_home = find_cuda_home()
    info["cuda_home"] = nvcc_home
    if nvcc_home:
        try:
            out = subprocess.run([os.path.join(nvcc_home, "bin", "nvcc"), "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
            info["nvcc"] = (re.findall(r"release [^\n]*", out) or [out.strip()[-80:]])[0]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvcc"] = f"error: {exc}"
    info["compute_sanitizer"] = find_sanitizer(nvcc_home)
    info["ninja_binary"] = shutil.which("ninja")
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "clocks.max.mem", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30).stdout.strip().splitlines()
            info["nvidia_smi"] = out[0] if out else None
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None


def find_sanitizer(cuda_home: str | None) -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in filter(None, (cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            path = os.path.join(home, rel)
            if os.access(path, os.X_OK):
                return path
    return None


def checkout_info() -> dict:
    info = {"root": ROOT}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout
        info["dirty"] = bool(status.strip())
    except (OSError, subprocess.TimeoutExpired):
        info["commit"], info["dirty"] = None, None
    return info


def make_pythonpath(shim_root: str) -> str:
    """A folder with `structalign_kernels` -> kernels/ (what the editable install maps), then the checkout."""
    link = os.path.join(shim_root, "structalign_kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join(ROOT, "kernels"), link)
    parts = [shim_root, ROOT]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


# ---- steps -----------------------------------------------------------------------------------------------------------

def step_build(r: Runner, env: dict, info: dict, jobs: int) -> None:
    name = "build"
    if r.dry_run:
        t0 = time.monotonic()
        libs = glob.glob(os.path.join(ROOT, "structalign", "_C*.so"))
        sources = [p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True) if os.path.isfile(p)]
        if not info.get("torch_cuda"):  # a CPU build of torch compiles no CUDA source
            sources = [p for p in sources if not os.path.relpath(p, ROOT).startswith(os.path.join("csrc", "cuda"))]
        cap = info.get("capability") or [9, 0]
        would = {"command": [r.python, "setup.py", "build_ext", "--inplace"],
                 "env": {"STRUCTALIGN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{cap[0]}.{cap[1]}", "MAX_JOBS": str(jobs),
                         "CUDA_HOME": info.get("cuda_home")}}
        if not libs:
            r.record(name, "failed", "dry run: no structalign/_C*.so (run make ext)", time.monotonic() - t0,
                     details={"would_run": would})
            return
        lib = max(libs, key=os.path.getmtime)
        stale, how = build_staleness(lib, sources, r.python)
        details = {"library": os.path.relpath(lib, ROOT), "stale": stale, "checked_by": how, "would_run": would}
        if stale:
            r.record(name, "failed", f"dry run: {os.path.basename(lib)} is not current ({how}): {stale[:3]} (run "
                     "make ext)", time.monotonic() - t0, details=details)
        else:
            r.record(name, "ok", f"dry run: {os.path.basename(lib)} is current ({how})", time.monotonic() - t0,
                     details=details)
        return

    cuda_home = info.get("cuda_home")
    cap = info.get("capability")
    if not info.get("have_setuptools"):
        r.record(name, "failed", "setuptools is not installed for this python: cannot run setup.py")
        return
    if cuda_home is None:
        r.record(name, "failed", "no CUDA toolkit (nvcc) found: CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda")
        return
    arch = f"{cap[0]}.{cap[1]}"
    benv = dict(env, STRUCTALIGN_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs), CUDA_HOME=cuda_home)
    timeout = r.timeout_for(name)
    if timeout < 30:
        r.record(name, "skipped", f"no time left in the {r.budget:.0f} s budget")
        return
    details = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": jobs, "CUDA_HOME": cuda_home,
               "ninja": bool(info.get("have_ninja") or info.get("ninja_binary"))}
    if not details["ninja"]:
        print("[gpu-check] note: ninja is not installed; torch compiles the sources one after another", flush=True)
    with open(BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = r.run(name, [r.python, "setup.py", "build_ext", "--inplace"], benv, timeout)
    if res["timed_out"] or res["returncode"] != 0:
        errors = [ln for ln in res["output"].splitlines() if re.search(r"error|Error|FAILED", ln)][:15]
        r.record(name, "timeout" if res["timed_out"] else "failed",
                 f"build_ext {'timed out after %.0f s' % timeout if res['timed_out'] else 'failed'} "
                 f"(rc={res['returncode']})", res["seconds"], command=res["command"], returncode=res["returncode"],
                 log=res["log"], details=dict(details, errors=errors, output_tail=tail(res["output"])))
        return
    check = r.run(name, [r.python, os.path.join("tools", "check_cuda_build.py"), "structalign", "--archs", arch],
                  benv, 120, log_name="build-check")
    details.update(check_output=check["output"].splitlines()[1:][-12:])
    sass = re.findall(r"SASS in [^:]+: (.*?)(?: \(listed by .*)?$", check["output"], re.M)
    details["sass"] = sass[0] if sass else None
    ok = check["returncode"] == 0
    r.record(name, "ok" if ok else "failed",
             f"built for sm_{arch.replace('.', '')} with {jobs} jobs; " + (
                 f"every op has a CUDA kernel; SASS: {details['sass']}" if ok else "check_cuda_build FAILED: " +
                 (check["output"].strip().splitlines() or ["?"])[-1]),
             res["seconds"] + check["seconds"], command=res["command"], returncode=res["returncode"], log=res["log"],
             timeout_s=round(timeout, 1), details=details)


def build_staleness(lib: str, sources: list, python: str) -> tuple:
    """([what is out of date], how it was checked). Asks ninja (`ninja -n` in the in-place build's temp folder, which
    knows every header each object includes) and checks that the .so is not older than the objects; without a
    ninja build folder, compares modification times with the files under csrc/."""
    ninja = shutil.which("ninja") or os.path.join(os.path.dirname(python), "ninja")
    folders = sorted(glob.glob(os.path.join(ROOT, "build", "temp.*", "build.ninja")), key=os.path.getmtime)
    if folders and os.access(ninja, os.X_OK):
        folder = os.path.dirname(folders[-1])
        proc = subprocess.run([ninja, "-n", "-C", folder], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            pending = re.findall(r" -o (\S+\.o)\b", proc.stdout)
            if "no work to do" not in proc.stdout:
                return [os.path.relpath(p, ROOT) for p in pending] or ["ninja has work to do"], "ninja -n"
            objects = glob.glob(os.path.join(folder, "**", "*.o"), recursive=True)
            newer = [os.path.relpath(o, ROOT) for o in objects if os.path.getmtime(o) > os.path.getmtime(lib) + 1]
            return newer, "ninja -n, and the .so is newer than its objects"
    stale = sorted(os.path.relpath(p, ROOT) for p in sources if os.path.getmtime(p) > os.path.getmtime(lib))
    return stale, "modification times of csrc/"


def step_tests(r: Runner, env: dict, info: dict) -> None:
    name = "gpu_tests"
    details = {"pytest": info.get("pytest_version"), "hypothesis": info.get("hypothesis_version"),
               "dali": bool(info.get("have_nvidia_dali"))}
    if not info.get("have_pytest"):
        r.record(name, "failed", f"pytest is not installed for {r.python}: the gpu tests were NOT run "
                 "(bring a pytest wheel; pip cannot reach the internet here)", details=details)
        return
    base = [r.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=", "tests"]
    if r.dry_run:
        res = r.run(name, base + ["--collect-only", "-q"], env, r.timeout_for(name))
        ids = [ln for ln in res["output"].splitlines() if "::" in ln and not ln.startswith(("$", "ERROR"))]
        counts = re.findall(r"(\d+)(?:/(\d+))? tests? (?:collected|selected)", res["output"])
        errors = [ln for ln in res["output"].splitlines() if ln.startswith("ERROR")]
        details.update(collected=len(ids), tests=ids, collection_errors=errors)
        ok = res["returncode"] == 0 and not res["timed_out"]
        r.record(name, "ok" if ok else ("timeout" if res["timed_out"] else "failed"),
                 f"dry run: {len(ids)} gpu tests collected" + (f" (of {counts[0][1]})" if counts and counts[0][1]
                                                               else "") +
                 (f"; {len(errors)} collection errors" if errors else ""),
                 res["seconds"], command=res["command"], returncode=res["returncode"], log=res["log"],
                 details=details)
        return
    junit = os.path.join(r.out, "gpu-tests.xml")
    timeout = r.timeout_for(name)
    if timeout < 20:
        r.record(name, "skipped", f"no time left in the {r.budget:.0f} s budget", details=details)
        return
    res = r.run(name, base + ["-q", "-rfEs", "--continue-on-collection-errors", f"--junitxml={junit}",
                              "--durations=15"], env, timeout)
    summary = parse_junit(junit)
    details.update(summary)
    status = "timeout" if res["timed_out"] else ("ok" if res["returncode"] == 0 else "failed")
    if res["returncode"] == 5:
        status, text = "failed", "no gpu-marked test was collected"
    else:
        c = summary.get("counts", {})
        text = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                f"{c.get('skipped', 0)} skipped")
        if res["timed_out"]:
            text = f"timed out after {timeout:.0f} s; so far: " + text
    r.record(name, status, text, res["seconds"], command=res["command"], returncode=res["returncode"],
             log=res["log"], details=dict(details, output_tail=tail(res["output"], 4000)))


def parse_junit(path: str) -> dict:
    if not os.path.exists(path):
        return {"counts": {}, "failures": [], "slowest": []}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"counts": {}, "failures": [], "slowest": [], "junit_error": str(exc)}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skipped, times = [], [], []
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        times.append((float(case.get("time") or 0), test))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": test, "kind": child.tag, "message": (message or [""])[0][:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                skipped.append({"test": test, "reason": (child.get("message") or "")[:200]})
        counts[outcome] += 1
    slowest = [{"test": t, "seconds": round(s, 1)} for s, t in sorted(times, reverse=True)[:10]]
    return {"counts": counts, "failures": failures, "skipped_tests": skipped[:100], "slowest": slowest}


def step_sanitizer(r: Runner, env: dict, info: dict, tool: str) -> None:
    name = tool
    driver = [r.python, os.path.join("tools", "sanitize_ops.py")]
    sanitizer = info.get("compute_sanitizer")
    if r.dry_run:
        would = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "86"] + driver + [
            "--device", "cuda", "--backend", "cpp"]
        if tool != "memcheck":
            r.record(name, "skipped", "dry run: the CPU run of the driver is under memcheck",
                     details={"would_run": would})
            return
        res = r.run(name, driver + ["--device", "cpu", "--backend", "cpp"], env, r.timeout_for(name))
        last = [ln for ln in res["output"].splitlines() if ln.startswith("sanitize-driver:")]
        status = "timeout" if res["timed_out"] else ("ok" if res["returncode"] == 0 else (
            "skipped" if res["returncode"] == 2 else "failed"))
        r.record(name, status, "dry run: driver on CPU tensors: " + (last[-1] if last else "no output") +
                 f"; compute-sanitizer: {sanitizer or 'not found here'}", res["seconds"], command=res["command"],
                 returncode=res["returncode"], log=res["log"],
                 details={"would_run": would, "driver_lines": last, "output_tail": tail(res["output"], 1500)})
        return
    if sanitizer is None:
        r.record(name, "skipped", "compute-sanitizer not found (PATH, CUDA_HOME/bin, CUDA_HOME/compute-sanitizer)")
        return
    timeout = r.timeout_for(name)
    if timeout < 15:
        r.record(name, "skipped", f"no time left in the {r.budget:.0f} s budget")
        return
    senv = dict(env)
    if tool == "memcheck":
        senv["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # exact allocation bounds, not the caching allocator's blocks
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "30"] + driver + [
        "--device", "cuda", "--backend", "cpp"] + (["--quick"] if tool == "racecheck" else [])
    res = r.run(name, cmd, senv, timeout)
    out = res["output"]
    driver_lines = [ln for ln in out.splitlines() if "sanitize-driver:" in ln]
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", out)]
    races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", out)
    hazards = {"hazards": sum(int(h) for h, _, _ in races), "errors": sum(int(e) for _, e, _ in races),
               "warnings": sum(int(w) for _, _, w in races)} if races else None
    reports = [ln for ln in out.splitlines() if ln.startswith("=========") and "SUMMARY" not in ln][:40]
    details = {"sanitizer": sanitizer, "error_summary": errors, "racecheck": hazards, "driver_lines": driver_lines,
               "reports": reports, "output_tail": tail(out, 3000)}
    n_errors = sum(errors) + (hazards["errors"] if hazards else 0)
    driver_skipped = any("SKIPPED" in ln for ln in driver_lines)
    if res["timed_out"]:
        status, text = "timeout", f"timed out after {timeout:.0f} s"
    elif driver_skipped:
        status, text = "skipped", driver_lines[-1].split("sanitize-driver:", 1)[1].strip()
    elif not driver_lines and not errors and not races:
        reason = next((ln.strip("= ").strip() for ln in out.splitlines()
                       if any(p.lower() in ln.lower() for p in ATTACH_FAILURES)), None)
        if reason:
            status, text = "skipped", f"compute-sanitizer could not attach: {reason[:200]}"
        else:
            status, text = "failed", f"the driver printed nothing (rc={res['returncode']}); see {res['log']}"
    elif n_errors or res["returncode"] != 0:
        status = "failed"
        text = (f"{n_errors} errors" + (f", {hazards['hazards']} hazards" if hazards else "") +
                f" (rc={res['returncode']}); " + (driver_lines[-1].split('sanitize-driver:', 1)[1].strip()
                                                  if driver_lines else "the driver did not finish"))
    else:
        status = "ok"
        text = "0 errors" + (f", {hazards['warnings']} warnings" if hazards and hazards["warnings"] else "") + \
            "; " + driver_lines[-1].split("sanitize-driver:", 1)[1].strip()
    r.record(name, status, text, res["seconds"], command=res["command"], returncode=res["returncode"],
             log=res["log"], details=details)


def step_benchmark(r: Runner, env: dict, info: dict, extra: list) -> dict | None:
    name = "benchmark"
    bench_json = os.path.join(r.out, "bench.json")
    if os.path.exists(bench_json):
        os.remove(bench_json)
    cmd = [r.python, os.path.join("benchmarks", "ops.py"), "--json", bench_json]
    if r.dry_run:
        cmd += ["--device", "cpu", "--quick", "--batch", "2", "--channels", "16", "--dtype", "fp32",
                "--copy-mb", "8", "--providers", "eager,reference,compile,cpp"] + extra
        timeout = r.timeout_for(name)
    else:
        timeout = r.timeout_for(name)
        if timeout < 30:
            r.record(name, "skipped", f"no time left in the {r.budget:.0f} s budget")
            return None
        cmd += ["--device", "cuda", "--batch", "4096,1024,256,64", "--dtype", "bf16,fp32", "--channels", "128,256",
                "--time-budget", str(max(int(timeout) - 45, 10))] + extra
    res = r.run(name, cmd, env, timeout)
    bench = None
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            bench = json.load(f)
    rows = bench["rows"] if bench else []
    errors = [f"{x['backend']} {x['shape']} {x['mode']}: {x['error']}" for x in rows if x.get("error")]
    complete = bool(bench and bench["meta"].get("complete") and not res["timed_out"])
    status = "timeout" if res["timed_out"] else ("ok" if res["returncode"] == 0 and not errors else "failed")
    copy = bench["meta"].get("copy_GBps") if bench else None
    text = (f"{len(rows)} rows" + ("" if complete else " (cut short by the time budget)") +
            (f"; copy bandwidth {copy:.0f} GB/s" if copy else "") + (f"; {len(errors)} rows with errors" if errors
                                                                     else "") +
            ("" if bench else f"; no results (rc={res['returncode']})"))
    r.record(name, status, ("dry run: " if r.dry_run else "") + text, res["seconds"], command=res["command"],
             returncode=res["returncode"], log=res["log"],
             details={"json": "bench.json" if bench else None, "complete": complete, "errors": errors[:30],
                      "output_tail": tail(res["output"], 1500) if not bench or res["returncode"] else ""})
    return bench


def _benchmark_rows_step(r: Runner, env: dict, name: str, cmd: list, min_seconds: float, summary) -> None:
    """Run a benchmark script that writes {"rows": [...]} to OUT/<name>.json (cmd gets --json appended) and record
    it: ok when it exits 0 with rows, each row summarised by summary(row) (None leaves the row out of the text)."""
    out_json = os.path.join(r.out, f"{name}.json")
    if os.path.exists(out_json):
        os.remove(out_json)
    timeout = r.timeout_for(name)
    if not r.dry_run and timeout < min_seconds:
        r.record(name, "skipped", f"no time left in the {r.budget:.0f} s budget")
        return
    res = r.run(name, cmd + ["--json", out_json], env, timeout)
    rows = []
    if os.path.exists(out_json):
        with open(out_json) as f:
            rows = json.load(f)["rows"]
    status = "timeout" if res["timed_out"] else ("ok" if res["returncode"] == 0 and rows else "failed")
    text = "; ".join(t for t in map(summary, rows) if t) or f"no results (rc={res['returncode']})"
    r.record(name, status, ("dry run: " if r.dry_run else "") + text, res["seconds"], command=res["command"],
             returncode=res["returncode"], log=res["log"],
             details={"json": f"{name}.json" if rows else None, "rows": rows,
                      "output_tail": tail(res["output"], 1500) if not rows or res["returncode"] else ""})


def step_train_benchmark(r: Runner, env: dict) -> None:
    """benchmarks/train.py's training loop for 200 steps (6 tiny steps on the CPU in a dry run): images/s."""
    cmd = [r.python, os.path.join("benchmarks", "train.py"), "--sections", "loop"]
    cmd += ["--dry-run"] if r.dry_run else ["--steps", "200"]

    def summary(x: dict) -> str:
        target = (f" (target {x['target_images_per_s']}: {'met' if x['meets_target'] else 'MISSED'})"
                  if "meets_target" in x else "")
        return (f"{x['case']} batch {x['batch']} {x['precision']}, {x['data']} data: "
                f"{_f(x['images_per_s'], '{:.0f}')} img/s, data wait "
                f"{_f(x['data_wait_share'] and 100 * x['data_wait_share'], '{:.0f}')} %" + target)

    _benchmark_rows_step(r, env, "train_bench", cmd, 30, summary)


def step_head_benchmark(r: Runner, env: dict) -> None:
    """benchmarks/head.py: the L-GRN head's non-GEMM share with the fused layer and today's, B = 1024 and 4096 bf16
    on the GPU (B = 2 fp32 on the CPU in a dry run)."""
    cmd = [r.python, os.path.join("benchmarks", "head.py"), "--providers", "gemm,fused,today"]
    cmd += (["--device", "cpu", "--batches", "2", "--reps", "1", "--warmup", "0"] if r.dry_run else
            ["--device", "cuda", "--dtype", "bf16", "--batches", "1024,4096", "--reps", "10", "--warmup", "2"])
    _benchmark_rows_step(r, env, "head_bench", cmd, 20, lambda x: (
        f"B {x['batch']} {x['dtype']} {x['provider']}: {_f(x['median_ms'], '{:.2f}')} ms, non-GEMM "
        f"{_f(x['non_gemm_share'] * 100, '{:.0f}')} %" if "non_gemm_share" in x else None))


# ---- results ---------------------------------------------------------------------------------------------------------

def targets(bench: dict | None, dry_run: bool) -> list:
    """The issue's targets on the forward+backward rows of the fused backends at the largest batch, bf16."""
    if not bench:
        return []
    rows = [x for x in bench["rows"] if x["mode"] == "full" and x["backend"] in ("cpp", "triton")]
    if not rows:
        return []
    batch = max(x["batch"] for x in rows)
    dtype = "bf16" if any(x["dtype"] == "bf16" for x in rows) else rows[0]["dtype"]
    out = []
    for x in rows:
        if x["batch"] != batch or x["dtype"] != dtype:
            continue
        checks = {k: (x.get(k) is not None and x[k] >= v) for k, v in TARGETS.items()}
        out.append({"op": x["op"], "shape": x["shape"], "backend": x["backend"], "median_ms": x.get("median_ms"),
                    "bytes": x.get("bytes"), "pct_copy": x.get("pct_copy"),
                    "speedup_vs_eager": x.get("speedup_vs_eager"), "speedup_vs_compile": x.get("speedup_vs_compile"),
                    "error": x.get("error"), "checks": checks, "met": all(checks.values()) and not x.get("error"),
                    "informational": dry_run})
    return out


def _f(v, fmt="{:.3g}", none="-"):
    return none if v is None else fmt.format(v)


def write_markdown(path: str, result: dict) -> None:
    m, steps, bench = result["machine"], result["steps"], result.get("benchmark") or {}
    device = m.get("device") or ("CPU (dry run)" if result["dry_run"] else "no CUDA device")
    lines = [f"# gpu-check: {device}, {result['started'][:10]}", ""]
    if result["dry_run"]:
        lines += ["**Dry run on a CPU**: no GPU figure below; the steps only prove that the script works.", ""]
    co = result["checkout"]
    lines += [f"Device: {device}" + (f", sm_{''.join(map(str, m['capability']))}, {m.get('sm_count')} SMs, "
                                     f"{m.get('device_memory_GiB')} GiB" if m.get("capability") else "") +
              (f"; nvidia-smi: {m['nvidia_smi']}" if m.get("nvidia_smi") else ""),
              f"Software: python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton "
              f"{m.get('triton_version')}, nvcc {m.get('nvcc')}, {m.get('cpu_count')} cores; missing modules: "
              f"{', '.join(m.get('missing_modules') or []) or '-'}",
              f"Checkout: {co.get('commit') or '?'}{' + local changes' if co.get('dirty') else ''}; "
              f"total {result['total_s']:.0f} s (budget {result['budget_s']:.0f} s); "
              f"{'all steps passed or skipped' if result['ok'] else 'SOME STEPS FAILED'}", "",
              "| step | status | seconds | summary |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['summary'].replace('|', '/')} |")
    tests = next((s for s in steps if s["name"] == "gpu_tests"), None)
    if tests and tests["details"].get("failures"):
        lines += ["", "Failing tests:", ""]
        lines += [f"- `{f['test']}`: {f['message'].replace('|', '/')}" for f in tests["details"]["failures"][:30]]
    if bench.get("rows"):
        copy = bench["meta"].get("copy_GBps")
        lines += ["", f"## Ops, forward + backward ({bench['meta'].get('device')}; copy bandwidth "
                      f"{_f(copy, '{:.0f}')} GB/s measured in the same run)", "",
                  f"ms: median of {'CUDA-event' if result['machine'].get('cuda_available') else 'perf_counter'} "
                  "timings; MB: bytes the op cannot avoid moving (benchmarks/ops.py's docstring); %copy: MB / time / "
                  "copy bandwidth.", ""]
        providers = [p for p in ("eager", "compile", "reference", "cpp", "triton")
                     if any(x["backend"] == p for x in bench["rows"])]
        fused = [p for p in ("cpp", "triton") if p in providers]
        head = ["op", "shape", "MB"] + [f"{p} ms" for p in providers]
        for p in fused:
            head += [f"{p} %copy", f"{p} vs eager", f"{p} vs compile"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        full = [x for x in bench["rows"] if x["mode"] == "full"]
        keys = list(dict.fromkeys((x["op"], x["shape"]) for x in full))
        for op, shape in keys:
            by = {x["backend"]: x for x in full if x["op"] == op and x["shape"] == shape}
            any_row = next(iter(by.values()))
            cells = [op, shape, _f(any_row.get("bytes") and any_row["bytes"] / 1e6, "{:.3g}")]
            for p in providers:
                x = by.get(p)
                cells.append("-" if x is None else ("ERROR" if x.get("error") else _f(x.get("median_ms"), "{:.3f}")))
            for p in fused:
                x = by.get(p) or {}
                cells += [_f(x.get("pct_copy"), "{:.0f} %"), _f(x.get("speedup_vs_eager"), "{:.2f}×"),
                          _f(x.get("speedup_vs_compile"), "{:.2f}×")]
            lines.append("| " + " | ".join(cells) + " |")
        if not bench["meta"].get("complete", True):
            lines += ["", f"The time budget cut the benchmark short: {bench['meta'].get('cases_not_run')} cases not "
                          "run (the largest batches run first)."]
    if result.get("targets"):
        t0 = result["targets"][0]
        lines += ["", f"## Targets at {t0['shape'].split()[0]} (forward + backward): ≥ {TARGETS['pct_copy']:.0f} % "
                      f"of copy bandwidth, ≥ {TARGETS['speedup_vs_eager']:.0f}× eager, ≥ "
                      f"{TARGETS['speedup_vs_compile']}× compile" +
                      (" (dry run on a CPU: informational only)" if result["dry_run"] else ""), "",
                  "| op | shape | backend | ms | %copy | vs eager | vs compile | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['op']} | {t['shape']} | {t['backend']} | {_f(t['median_ms'], '{:.3f}')} | "
                         f"{_f(t['pct_copy'], '{:.0f} %')} | {_f(t['speedup_vs_eager'], '{:.2f}×')} | "
                         f"{_f(t['speedup_vs_compile'], '{:.2f}×')} | "
                         f"{'ERROR' if t['error'] else ('yes' if t['met'] else 'no')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, logs/")
    parser.add_argument("--dry-run", action="store_true", help="run every step possible on the CPU")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS of the build (cores)")
    parser.add_argument("--python", default=sys.executable, help="the python (with torch) to run everything with")
    parser.add_argument("--skip", default="", help="comma list of steps not to run: " + ", ".join(STEPS))
    parser.add_argument("--bench-args", default="", help="extra arguments for benchmarks/ops.py")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"unknown steps {sorted(skip - set(STEPS))}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = now_iso()
    runner = Runner(out, args.budget, args.dry_run, args.python)

    base_env = {k: v for k, v in os.environ.items() if k not in ("MAX_JOBS", "TRITON_INTERPRET", "STRUCTALIGN_BACKEND")}
    shim_root = tempfile.mkdtemp(prefix="structalign-gpu-check-")
    try:
        info = probe(args.python, dict(base_env, PYTHONPATH=make_pythonpath(shim_root)))
        machine_extras(info)
        info["missing_modules"] = sorted(k[5:] for k, v in info.items() if k.startswith("have_") and v is False)
        env = dict(base_env, PYTHONPATH=make_pythonpath(shim_root),
                   PYTHONUNBUFFERED="1")
        print(f"[gpu-check] {info.get('device') or 'no CUDA device'}; python {info.get('python')}, torch "
              f"{info.get('torch')} (CUDA {info.get('torch_cuda')}), triton {info.get('triton_version')}, "
              f"{info.get('cpu_count')} cores; missing modules: {info['missing_modules'] or 'none'}; "
              f"out: {out}", flush=True)
        no_gpu = not args.dry_run and not info.get("cuda_available")
        if no_gpu:
            why = (f"torch cannot be imported by {args.python}: {info['torch_error']}" if info.get("torch_error")
                   else "no CUDA device (torch.cuda.is_available() is False); use --dry-run")
            for step in STEPS:
                runner.record(step, "skipped", why)
            bench = None
        else:
            bench = None
            for step in STEPS:
                if step in skip:
                    runner.record(step, "skipped", "--skip")
                    continue
                try:
                    if step == "build":
                        step_build(runner, env, info, args.jobs)
                    elif step == "gpu_tests":
                        step_tests(runner, env, info)
                    elif step in ("memcheck", "racecheck"):
                        step_sanitizer(runner, env, info, step)
                    elif step == "benchmark":
                        bench = step_benchmark(runner, env, info, args.bench_args.split())
                    elif step == "head_bench":
                        step_head_benchmark(runner, env)
                    else:
                        step_train_benchmark(runner, env)
                except Exception as exc:  # noqa: BLE001 (a broken step must not lose the others' results)
                    runner.record(step, "failed", f"gpu_check.py itself failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(shim_root, ignore_errors=True)

    total = time.monotonic() - runner.start
    result = {
        "schema": SCHEMA, "dry_run": args.dry_run, "started": started, "finished": now_iso(),
        "total_s": round(total, 1), "budget_s": args.budget,
        "ok": all(s["status"] in ("ok", "skipped") for s in runner.steps) and not no_gpu,
        "machine": info, "checkout": checkout_info(), "steps": runner.steps,
        "benchmark": bench, "targets": targets(bench, args.dry_run),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(os.path.join(out, "results.md"), result)
    verdict = "OK" if result["ok"] else "FAILED"
    print(f"[gpu-check] {verdict} in {total:.0f} s (budget {args.budget:.0f} s): {out}/results.json, results.md",
          flush=True)
    if no_gpu:
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
