"""The whole GPU path in one short run: build, gpu tests, compute-sanitizer, benchmarks -> results.json + results.md.

    python3 tools/gpu_check.py --out DIR              # on a GPU machine (make gpu-check OUT=DIR), <= 8 minutes
    python3 tools/gpu_check.py --out DIR --dry-run    # every step a CPU can run (tests/test_gpu_check.py)

For a GPU machine set up by others (Python 3.12, torch >= 2.11, Triton >= 3.6, no internet): it runs on that machine's
python3 and torch and installs nothing; what the checkout needs beyond such an image (pydantic) is put on PYTHONPATH
from .gpu-deps/cpXY (`make gpu-deps`, made where pip works). Each step (STEPS; README "GPU check") has its share of
--budget (PLAN); over it, it gets SIGINT (pytest still writes its report), then SIGKILL GRACE s later. A failing step
is recorded and the next one runs. Writes DIR/results.json, DIR/results.md (one screen), DIR/logs/<step>.log
(benchmark.log: every op row). Exit status 0 when no step failed or timed out, 1 otherwise, 2 without a GPU (no
--dry-run).
"""
import argparse, datetime, fcntl, glob, json, os, re, shlex  # noqa: E401
import shutil, signal, subprocess, sys, tempfile, time  # noqa: E401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_home import find_cuda_home  # noqa: E402
from gpu_check_report import SUMMARIES, parse_junit, targets, write_markdown  # noqa: E402

SCHEMA, BUILD_LOCK, GRACE = "structalign-gpu-check/1", "/tmp/structalign-build.lock", 15  # GRACE: SIGINT to SIGKILL
# step: (cap in s on a GPU, s kept back for the step while earlier ones run, cap in a dry run). The gpu tests get
# what the build leaves less what is kept back for the later steps: most of the 480 s (~270 s after a 60 s build).
PLAN = {"build": (150, 0, 400), "gpu_tests": (330, 0, 240), "memcheck": (60, 25, 300), "racecheck": (45, 15, 60),
        "benchmark": (75, 35, 300), "head_bench": (30, 15, 120), "train_bench": (100, 45, 180)}
STEPS = tuple(PLAN)
BENCHMARKS = {  # step: (script and arguments; more on a GPU; more in a dry run: tiny sizes, fp32, on the CPU)
    "benchmark": ("benchmarks/ops.py", "--device cuda --batch 4096,1024,256,64 --dtype bf16,fp32 --channels 128,256",
                  "--device cpu --quick --batch 2 --channels 16 --dtype fp32 --copy-mb 8 --providers "
                  "eager,reference,compile,cpp"),
    "head_bench": ("benchmarks/head.py --providers gemm,fused,unfused", "--device cuda --dtype bf16 --batches "
                   "1024,4096 --reps 10 --warmup 2", "--device cpu --batches 2 --reps 1 --warmup 0"),
    "train_bench": ("benchmarks/train.py --sections loader", "--steps 150", "--dry-run")}
MODULES = {"pytest": "pytest", "hypothesis": "hypothesis", "setuptools": "setuptools", "ninja": "ninja",
           "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml", "scipy": "scipy", "triton": "triton", "tqdm": "tqdm",
           "cv2": "opencv-python-headless", "pydantic": "pydantic", "nvidia.dali": None}
ATTACH_FAILURES = re.compile(r"Target application terminated before first instrumented API call|Unable to|not "
                             r"supported|No attachable process|Internal Sanitizer Error|Failed to initialize|could not "
                             r"be loaded|Error: Failed|permission", re.I)
PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, os, sys
info = {"python": sys.version.split()[0], "cache_tag": sys.implementation.cache_tag, "cpu_count": os.cpu_count()}
for mod, dist in MODULES.items():
    try:
        info["have_" + mod.replace(".", "_").lower()] = found = iu.find_spec(mod) is not None
    except ModuleNotFoundError:  # its parent package is missing
        info["have_" + mod.replace(".", "_").lower()] = found = False
    info.update({dist + "_version": md.version(dist)} if dist and found else {})
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=[p.major, p.minor], sm_count=p.multi_processor_count,
                    device_memory_GiB=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
print("PROBE" + json.dumps(info))
""".replace("MODULES", repr(MODULES))


def _default_sigint() -> None:
    """In a step's child, before exec: SIGINT back to its default. A check started in the background (`nohup ... &`)
    ignores SIGINT, a child would inherit that, and a step over time would then be killed without its report."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Runner:
    """Runs the steps in one time budget with env (the python under test's environment); keeps their records."""

    def __init__(self, out, budget, dry_run, python, env=None, info=None, jobs=1):
        self.out, self.budget, self.dry_run, self.python, self.jobs = out, budget, dry_run, python, jobs
        self.env, self.info, self.steps, self.bench, self.start = env or dict(os.environ), info or {}, [], None, \
            time.monotonic()
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def timeout(self, name: str) -> float:
        later = sum(PLAN[s][1] for s in STEPS[STEPS.index(name) + 1:])
        return PLAN[name][2] if self.dry_run else min(PLAN[name][0], self.budget - (time.monotonic() - self.start) -
                                                      later - GRACE)

    def run(self, name: str, cmd: list, timeout: float, env=None, log=None) -> dict:
        """cmd in its own process group, output to logs/<log or name>.log; over time: SIGINT, GRACE s, SIGKILL."""
        log, t0, timed_out = os.path.join("logs", f"{log or name}.log"), time.monotonic(), False
        with open(os.path.join(self.out, log), "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_default_sigint)
            for wait, sig in ((max(timeout, 1), signal.SIGINT), (GRACE, signal.SIGKILL), (None, None)):
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
        with open(os.path.join(self.out, log), errors="replace") as f:
            return {"returncode": proc.returncode, "timed_out": timed_out, "seconds": time.monotonic() - t0,
                    "output": f.read(), "log": log, "command": cmd, "timeout_s": round(timeout, 1)}

    def record(self, name: str, status: str, summary: str, res=None, **details) -> dict:
        res = res or {}
        if res.get("timed_out"):
            status, summary = "timeout", f"interrupted after {res['timeout_s']:.0f} s; {summary}"
        step = {"name": name, "status": status, "seconds": round(res.get("seconds", 0.0), 1), "summary": summary,
                **{k: res.get(k) for k in ("command", "returncode", "log", "timeout_s")}, "details": details}
        self.steps.append(step)
        print(f"[gpu-check] {status.upper()[:4]:<4} {name:<11} {step['seconds']:6.1f} s  {summary}", flush=True)
        return step

    def step(self, name: str, cmd: list, judge, min_s: float = 15, env=None) -> dict:
        """cmd as step `name` in its share of the budget (none if under min_s, or under the step's cap where that is
        smaller); records judge(res) -> (status, summary, details)."""
        timeout = self.timeout(name)
        if timeout < min(min_s, PLAN[name][0]):
            return self.record(name, "skipped", f"no time left in the {self.budget:.0f} s budget")
        res = self.run(name, cmd, timeout, env)
        status, summary, details = judge(res)
        return self.record(name, status, ("dry run: " if self.dry_run else "") + summary, res, **details)


def probe(python: str, env: dict) -> dict:
    """What the python under test has (PROBE), the CUDA toolkit, nvidia-smi's line and compute-sanitizer."""
    proc = subprocess.run([python, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    info = ([json.loads(ln[5:]) for ln in proc.stdout.splitlines() if ln.startswith("PROBE")] or [
        {"probe_error": (proc.stdout + proc.stderr)[-1500:]}])[0]
    info["cuda_home"] = home = find_cuda_home()
    for key, cmd in {"nvcc": [f"{home}/bin/nvcc", "--version"], "nvidia_smi": ["nvidia-smi", "--format=csv,noheader",
                     "--query-gpu=name,driver_version,memory.total,clocks.max.sm"]}.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            info[key] = (re.findall(r"release [^\n]*", out) or out.splitlines() or [None])[0]
        except (OSError, subprocess.TimeoutExpired):
            info[key] = None
    places = [shutil.which("compute-sanitizer")] + [os.path.join(h, d, "compute-sanitizer") for h in filter(
        None, (home, os.environ.get("CUDA_HOME"), "/usr/local/cuda")) for d in ("bin", "compute-sanitizer")]
    info["compute_sanitizer"] = next((p for p in places if p and os.access(p, os.X_OK)), None)
    info["missing_modules"] = sorted(k[5:] for k, v in info.items() if k.startswith("have_") and not v)
    return info


# ---- steps: each runs its command through Runner.step, or records why it cannot -------------------------------------

def inplace_build(cache_tag: str) -> tuple:
    """(ninja folder of the in-place build for this python, the torch version it compiled against) or (None, None)."""
    for path in glob.glob(os.path.join(ROOT, "build", f"temp.*-{cache_tag}", "build.ninja")):
        try:
            site = re.search(r"-I(\S+)/torch/include\b", open(path).read())[1]
            version = re.search(r"__version__ = '([^']+)'", open(f"{site}/torch/version.py").read())[1]
            return os.path.dirname(path), version
        except (OSError, TypeError):
            continue
    return None, None


def step_build(r: Runner) -> None:
    """setup.py build_ext --inplace with the CUDA kernels for this GPU, then tools/check_cuda_build.py (every op has a
    CUDA kernel; the SASS listed). Dry run: this python's in-place .so must be built for its torch and current (`ninja
    -n` finds no work, no object is newer); where there is none, a CPU-only one is built in place (the file name
    holds the Python version: another python's .so is never touched)."""
    torch_v, lib = r.info["torch"], (glob.glob(f"{ROOT}/structalign/_C.{r.info['cache_tag']}*.so") or [None])[0]
    if r.dry_run and lib:
        folder, built_for = inplace_build(r.info["cache_tag"])
        if built_for != torch_v:
            return r.record("build", "failed", f"dry run: {os.path.basename(lib)} was built for torch "
                            f"{built_for or '? (no build folder in build/)'}, this python has torch {torch_v}: rebuild "
                            "it for this torch (make ext), or run the dry run on a python of another minor version")
        res = r.run("build", [shutil.which("ninja") or f"{os.path.dirname(r.python)}/ninja", "-n", "-C", folder], 60)
        stale = re.findall(r" -o (\S+\.o)\b", res["output"]) or ([] if "no work to do" in res["output"] else ["?"])
        stale += [o for o in glob.glob(f"{folder}/**/*.o", recursive=True) if os.path.getmtime(o) > os.path.getmtime(
            lib) + 1]
        return r.record("build", "failed" if stale or res["returncode"] else "ok", f"dry run: {os.path.basename(lib)} "
                        f"is {'NOT current (run make ext)' if stale else 'current'} (ninja -n, .so newer than objects)",
                        res, stale=[os.path.relpath(p, ROOT) for p in stale], built_for=built_for)
    home, cap = r.info.get("cuda_home"), r.info.get("capability") or [0, 0]
    if not r.info.get("have_setuptools") or (home is None and not r.dry_run):
        return r.record("build", "failed", "cannot build: " + ("no CUDA toolkit (nvcc) in CUDA_HOME, CUDA_PATH, PATH "
                        "or /usr/local/cuda" if r.info.get("have_setuptools") else "no setuptools in " + r.python))
    arch = f"{cap[0]}.{cap[1]}"
    env = dict(r.env, MAX_JOBS=str(r.jobs), **({"STRUCTALIGN_CUDA": "0"} if r.dry_run else dict(
        STRUCTALIGN_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, CUDA_HOME=home)))

    def judge(res):
        details = {"output": res["output"][-2500:], "errors": [
            ln for ln in res["output"].splitlines() if re.search(r"error|FAILED", ln, re.I)][:15]}
        if res["returncode"] != 0:
            return "failed", f"build_ext failed (rc={res['returncode']})", details
        if r.dry_run:
            return "ok", f"no .so for this python: built one in place (CPU only) for torch {torch_v}", details
        check = r.run("build", [r.python, "tools/check_cuda_build.py", "structalign", "--archs", arch], 120, env,
                      log="build-check")
        details = {"check_output": check["output"].splitlines()[-12:]}
        if check["returncode"]:
            return "failed", "check_cuda_build FAILED: " + (check["output"].strip().splitlines() or ["?"])[-1], details
        sass = (re.findall(r"SASS in [^:]+: (.*?)(?: \(listed by .*)?$", check["output"], re.M) or ["?"])[0]
        return "ok", f"built for sm_{arch.replace('.', '')} with {r.jobs} jobs; every op has a CUDA kernel; SASS: " \
            f"{sass}", details
    with open(BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r.step("build", [r.python, "setup.py", "build_ext", "--inplace"], judge, 30, env)


def step_tests(r: Runner) -> None:
    """pytest -m gpu, one line per test (-v), junit XML in DIR/gpu-tests.xml. Dry run: the tests collected."""
    if not r.info.get("have_pytest"):
        return r.record("gpu_tests", "failed", f"pytest is not installed for {r.python}: the gpu tests were NOT run "
                        "(carry a pytest wheel; pip cannot reach the internet there)")
    cmd, junit = [r.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=", "tests"], \
        os.path.join(r.out, "gpu-tests.xml")

    def collected(res):
        ids = [ln for ln in res["output"].splitlines() if "::" in ln and not ln.startswith(("$", "ERROR"))]
        errors = [ln for ln in res["output"].splitlines() if ln.startswith("ERROR")]
        return ("ok" if res["returncode"] == 0 else "failed"), f"{len(ids)} gpu tests collected" + (
            f"; {len(errors)} collection errors" if errors else ""), {"collected": len(ids), "errors": errors}

    def judge(res):
        found = parse_junit(junit)
        return ("failed", "no gpu-marked test was collected", found) if res["returncode"] == 5 else (
            "ok" if res["returncode"] == 0 else "failed", ", ".join(f"{n} {k}" for k, n in found["counts"].items()),
            dict(found, output=res["output"][-4000:]))
    if r.dry_run:
        return r.step("gpu_tests", cmd + ["--collect-only", "-q"], collected)
    r.step("gpu_tests", cmd + ["-v", "-rfE", "--continue-on-collection-errors", f"--junitxml={junit}",
                               "--durations=10"], judge, 20)


def step_sanitizer(r: Runner, tool: str) -> None:
    """compute-sanitizer --tool memcheck / racecheck (the driver's --quick cases) over tools/sanitize_ops.py, backends
    cpp and triton. Dry run: the driver's --quick cases on CPU tensors (Triton interpreted); racecheck skipped."""
    if r.dry_run and tool != "memcheck":
        return r.record(tool, "skipped", "dry run: the CPU run of the driver is under memcheck")
    if not r.dry_run and r.info.get("compute_sanitizer") is None:
        return r.record(tool, "skipped", "compute-sanitizer not found (PATH, CUDA_HOME/bin, "
                        "CUDA_HOME/compute-sanitizer)")

    def judge(res):
        out = res["output"]
        lines = [ln.split("sanitize-driver:", 1)[1].strip() for ln in out.splitlines() if "sanitize-driver:" in ln]
        races = [list(map(int, x)) for x in re.findall(
            r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", out)]
        errors = sum(map(int, re.findall(r"ERROR SUMMARY: (\d+) error", out))) + sum(x[1] for x in races)
        details = {"errors": errors, "hazards": sum(x[0] for x in races), "warnings": sum(x[2] for x in races),
                   "driver_lines": lines, "output": out[-3000:]}
        attach = [ln.strip("= ") for ln in out.splitlines() if ATTACH_FAILURES.search(ln)]
        if lines and lines[-1].startswith("SKIPPED"):
            return "skipped", lines[-1], details
        if not (lines or errors or races):
            return ("skipped", f"compute-sanitizer could not attach: {attach[0][:200]}", details) if attach else (
                "failed", f"the driver printed nothing (rc={res['returncode']}); see {res['log']}", details)
        last = lines[-1] if lines else "the driver did not finish"
        warn = f", {details['warnings']} warnings" if details["warnings"] else ""
        return ("failed" if errors or res["returncode"] else "ok"), f"driver on CPU tensors: {last}" if r.dry_run \
            else f"{errors} errors{warn} (rc={res['returncode']}); {last}", details
    driver = [r.python, "tools/sanitize_ops.py", "--backend", "cpp,triton", "--device", "cpu" if r.dry_run else "cuda"]
    if r.dry_run:
        return r.step(tool, driver + ["--quick"], judge, env=dict(r.env, TRITON_INTERPRET="1"))
    r.step(tool, [r.info["compute_sanitizer"], "--tool", tool, "--error-exitcode", "86", "--print-limit", "30"] +
           driver + (["--quick"] if tool == "racecheck" else []), judge,
           env=dict(r.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else r.env)  # exact bounds


def step_benchmark(r: Runner, name: str, extra: list) -> None:
    """A script of BENCHMARKS writing {"meta", "rows"} to DIR/<name>.json (bench.json for the op benchmark): ok when
    it exits 0 with rows and none has an error."""
    script, gpu_args, dry_args = BENCHMARKS[name]
    path = os.path.join(r.out, "bench.json" if name == "benchmark" else f"{name}.json")
    cmd = [r.python, *script.split(), *(dry_args if r.dry_run else gpu_args).split(), "--json", path, *extra] + (
        ["--time-budget", str(max(int(r.timeout(name)) - 45, 10))] if name == "benchmark" and not r.dry_run else [])

    def judge(res):
        data = json.load(open(path)) if os.path.exists(path) else {"rows": []}
        rows, errors, copy = data["rows"], [x for x in data["rows"] if x.get("error")], data.get("meta", {}).get(
            "copy_GBps")
        details = {"json": os.path.basename(path) if rows else None, "rows": rows, "meta": data.get("meta"),
                   "output": res["output"][-1500:] if not rows or res["returncode"] else ""}
        if name == "benchmark":
            r.bench = data if rows else None
            details["complete"] = bool(rows and data["meta"].get("complete") and not res["timed_out"])
        text = (f"{len(rows)} rows" + ("" if details["complete"] else " (cut short by the time budget)") + (
            f"; copy bandwidth {copy:.0f} GB/s" if copy else "")) if name == "benchmark" else "; ".join(
            filter(None, map(SUMMARIES[name], rows)))
        return ("ok" if res["returncode"] == 0 and rows and not errors else "failed"), (
            text if rows else f"no results (rc={res['returncode']})") + (
            f"; {len(errors)} rows with errors: {errors[0]['error']}" if errors else ""), details
    r.step(name, cmd, judge, 30 if name == "train_bench" else 20)


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
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(STEPS):
        parser.error(f"unknown steps {sorted(skip - set(STEPS))}")
    out, started = os.path.abspath(args.out), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    shim = tempfile.mkdtemp(prefix="structalign-gpu-check-")  # structalign_kernels -> kernels/, as installed
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(shim, "structalign_kernels"))
    tag = subprocess.run([args.python, "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"], text=True,
                         capture_output=True).stdout.strip()
    deps = f"{ROOT}/.gpu-deps/{tag}" if os.path.isdir(f"{ROOT}/.gpu-deps/{tag}") else None
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_JOBS", "TRITON_INTERPRET", "STRUCTALIGN_BACKEND")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [shim, ROOT, deps,
                                                                           env.get("PYTHONPATH")])))
    info = dict(probe(args.python, env), gpu_deps=deps)
    r = Runner(out, args.budget, args.dry_run, args.python, env, info, args.jobs)
    print(f"[gpu-check] {info.get('device') or 'no CUDA device'}; python {info.get('python')}, torch "
          f"{info.get('torch')} (CUDA {info.get('torch_cuda')}), triton {info.get('triton_version')}, "
          f"{info.get('cpu_count')} cores; missing: {', '.join(info.get('missing_modules', [])) or 'none'}; "
          f"{deps or f'no .gpu-deps/{tag} (make gpu-deps where pip works, then carry it)'}", flush=True)
    no_gpu = not args.dry_run and not info.get("cuda_available")
    why_not = f"torch cannot be imported by {args.python}: {info['torch_error']}" if info.get("torch_error") else \
        "no CUDA device (torch.cuda.is_available() is False); use --dry-run"
    run_step = {"build": step_build, "gpu_tests": step_tests, "memcheck": lambda r: step_sanitizer(r, "memcheck"),
                "racecheck": lambda r: step_sanitizer(r, "racecheck")} | {
        name: lambda r, name=name: step_benchmark(r, name, args.bench_args.split() if name == "benchmark" else [])
        for name in BENCHMARKS}
    try:
        for name in STEPS:
            try:
                if no_gpu or name in skip:
                    r.record(name, "skipped", "--skip" if name in skip else why_not)
                else:
                    run_step[name](r)
            except Exception as exc:  # noqa: BLE001 (a broken step must not lose the others' results)
                r.record(name, "failed", f"gpu_check.py itself failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(shim, ignore_errors=True)
    git = lambda *a: shutil.which("git") and subprocess.run(  # noqa: E731
        ["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"schema": SCHEMA, "dry_run": args.dry_run, "started": started, "finished": datetime.datetime.now()
              .astimezone().isoformat(timespec="seconds"), "total_s": round(time.monotonic() - r.start, 1),
              "budget_s": args.budget, "ok": all(s["status"] in ("ok", "skipped") for s in r.steps) and not no_gpu,
              "machine": info, "steps": r.steps, "benchmark": r.bench, "targets": targets(r.bench, args.dry_run),
              "checkout": {"root": ROOT, "commit": git("rev-parse", "HEAD") or None,
                           "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(os.path.join(out, "results.md"), result)
    print(f"[gpu-check] {'OK' if result['ok'] else 'FAILED'} in {result['total_s']:.0f} s (budget {args.budget:.0f} "
          f"s): {out}/results.json, results.md", flush=True)
    return 2 if no_gpu else 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
