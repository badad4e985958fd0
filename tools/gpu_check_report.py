"""What tools/gpu_check.py reads and writes: pytest's junit XML, one-line summaries of the benchmarks' rows, the
targets checked on the op benchmark, and results.md (one screen: the machine, the steps, the first failing tests, the
targets; every op row stays in logs/benchmark.log, every test in logs/gpu_tests.log)."""
import xml.etree.ElementTree as ET

TARGETS = {"pct_copy": 60.0, "speedup_vs_eager": 3.0, "speedup_vs_compile": 1.5}


def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def parse_junit(path: str) -> dict:
    """{"counts", "failures" [{test, kind, message}], "skipped_tests", "slowest"} of a pytest junit XML file."""
    found = {"counts": dict.fromkeys(("passed", "failed", "errors", "skipped"), 0), "failures": [],
             "skipped_tests": [], "slowest": []}
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as exc:
        return dict(found, junit_error=str(exc))
    for case in (c for c in cases if c.get("name")):  # a test interrupted by SIGINT is written without a name
        test, outcome = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":"), "passed"
        found["slowest"].append({"test": test, "seconds": round(float(case.get("time") or 0), 1)})
        for child in case:
            text = ((child.get("message") or child.text or "").strip().splitlines() or [""])[0]
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                found["failures"].append({"test": test, "kind": child.tag, "message": text[:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                found["skipped_tests"].append({"test": test, "reason": text[:200]})
        found["counts"][outcome] += 1
    found["slowest"] = sorted(found["slowest"], key=lambda t: -t["seconds"])[:10]
    return found


SUMMARIES = {  # step: one row's summary (None: left out)
    "head_bench": lambda x: f"B {x['batch']} {x['dtype']} {x['provider']}: {_f(x['median_ms'], '{:.2f}')} ms, "
    f"non-GEMM {_f(x['non_gemm_share'] * 100, '{:.0f}')} %" if "non_gemm_share" in x else None,
    "train_bench": lambda x: f"{x['case']} B {x['batch']} {x['precision']}, {x['data']} data: "
    f"{_f(x['images_per_s'], '{:.0f}')} img/s, data wait "
    f"{_f(x['data_wait_share'] and x['data_wait_share'] * 100, '{:.1f}')} %" + (
        f" (goal: {'met' if x['meets_goal'] else 'MISSED'})" if "meets_goal" in x else "")}


def targets(bench: dict | None, dry_run: bool) -> list:
    """TARGETS on the forward + backward rows of the fused backends at the largest batch, bf16 where measured."""
    rows = [x for x in (bench or {}).get("rows", []) if x["mode"] == "full" and x["backend"] in ("cpp", "triton")]
    batch = max((x["batch"] for x in rows), default=None)
    dtype = "bf16" if any(x["dtype"] == "bf16" for x in rows) else rows and rows[0]["dtype"]
    return [{k: x.get(k) for k in ("op", "shape", "backend", "median_ms", "bytes", "error", *TARGETS)} | {
        "checks": (checks := {k: x.get(k) is not None and x[k] >= v for k, v in TARGETS.items()}),
        "met": all(checks.values()) and not x.get("error"), "informational": dry_run}
        for x in rows if x["batch"] == batch and x["dtype"] == dtype]


def write_markdown(path: str, result: dict) -> None:
    """One screen: the machine, the steps, the first failing tests, the targets (all op rows: logs/benchmark.log)."""
    m, co, steps = result["machine"], result["checkout"], result["steps"]
    device = m.get("device") or ("CPU" if result["dry_run"] else "no CUDA device")
    if m.get("capability"):
        device += (f", sm_{''.join(map(str, m['capability']))}, {m.get('sm_count')} SMs, "
                   f"{m.get('device_memory_GiB')} GiB; {m.get('nvidia_smi')}")
    lines = [f"# gpu-check: {m.get('device') or device}, {result['started'][:10]}" + (
        " (DRY RUN on a CPU: no GPU figure)" if result["dry_run"] else ""), "", f"Device: {device}",
        f"Software: python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton "
        f"{m.get('triton_version')}, nvcc {m.get('nvcc')}, {m.get('cpu_count')} cores; missing: "
        f"{', '.join(m.get('missing_modules') or []) or '-'}; .gpu-deps: {m.get('gpu_deps') or '-'}",
        f"Checkout {co.get('commit') or '?'}{' + local changes' if co.get('dirty') else ''}; {result['total_s']:.0f} s "
        f"of {result['budget_s']:.0f}; {'all steps passed or skipped' if result['ok'] else 'SOME STEPS FAILED'}", "",
        "| step | status | s | summary |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['summary'][:300].replace('|', '/')} |"
              for s in steps]
    failures = next((s["details"].get("failures") for s in steps if s["name"] == "gpu_tests"), None) or []
    lines += ["", f"Failing tests ({len(failures)}; all in logs/gpu_tests.log):"] + [
        f"- `{f['test']}`: {f['message'][:120].replace('|', '/')}" for f in failures[:5]] if failures else []
    if result["targets"]:
        lines += ["", f"Targets at {result['targets'][0]['shape'].split()[0]}, forward + backward: >= "
                  f"{TARGETS['pct_copy']:.0f} % of copy bandwidth, >= {TARGETS['speedup_vs_eager']:.0f}x eager, >= "
                  f"{TARGETS['speedup_vs_compile']}x compile{' (informational)' if result['dry_run'] else ''}", "",
                  "| op | shape | backend | ms | %copy | vs eager | vs compile | met |", "|---" * 8 + "|"]
        lines += [f"| {t['op']} | {' '.join(t['shape'].split()[1:])} | {t['backend']} | "
                  f"{_f(t['median_ms'], '{:.3f}')} | {_f(t['pct_copy'], '{:.0f} %')} | "
                  f"{_f(t['speedup_vs_eager'], '{:.2f}x')} | {_f(t['speedup_vs_compile'], '{:.2f}x')} | "
                  f"{'ERROR' if t['error'] else 'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


