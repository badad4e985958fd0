"""Check a CUDA build of structalign._C (made by `make check-cuda`, or by tools/gpu_check.py): load the newest .so,
check that every op has a CUDA kernel, list the SASS (and PTX) architectures it carries, and check the torch version.

    python tools/check_cuda_build.py build/check-cuda/lib [--archs "8.0;9.0"] [--torch-pin 2.13.0]

--archs: TORCH_CUDA_ARCH_LIST of the build; every listed architecture must have SASS in the .so ("+PTX" entries
must also have PTX). --torch-pin: the release the runtime pins; the loading torch must have the same minor version.
cuobjdump comes from the CUDA toolkit (CUDA_HOME, PATH) or from Triton's wheel (triton/backends/nvidia/bin), which
ships one where a minimal toolkit has none.
"""
import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys


def newest_library(lib_dir: str) -> str | None:
    """The most recently written structalign/_C*.so under lib_dir (or lib_dir itself if it is a .so)."""
    if os.path.isfile(lib_dir):
        return lib_dir
    found = glob.glob(os.path.join(lib_dir, "structalign", "_C*.so")) + glob.glob(os.path.join(lib_dir, "_C*.so"))
    return max(found, key=os.path.getmtime) if found else None


def find_cuobjdump() -> str | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")  # located without importing triton
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


def expected_archs(arch_list: str) -> tuple:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a", "8.6 9.0") -> ({"sm_80", "sm_90"}, {"compute_90"})."""
    sass, ptx = set(), set()
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        with_ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX")
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item)
        if not match:
            continue  # named architectures ("Hopper") are left to torch
        num = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        sass.add(f"sm_{num}")
        if with_ptx:
            ptx.add(f"compute_{num}")
    return sass, ptx


def list_architectures(so_path: str) -> dict:
    """{"cuobjdump": path, "sass": {"sm_90": n_cubins, ...}, "ptx": {...}} or {"error": ...}."""
    tool = find_cuobjdump()
    if tool is None:
        return {"error": "no cuobjdump (CUDA toolkit or Triton wheel) found"}
    out = {"cuobjdump": tool, "sass": {}, "ptx": {}}
    for flag, key, pattern in (("--list-elf", "sass", r"\.(sm_\d+[af]?)\.cubin"),
                               ("--list-ptx", "ptx", r"\.(sm_\d+[af]?)\.ptx")):
        proc = subprocess.run([tool, flag, so_path], capture_output=True, text=True)
        if proc.returncode != 0 and "does not contain" not in (proc.stderr + proc.stdout):
            out.setdefault("warnings", []).append(f"{flag}: rc={proc.returncode} {proc.stderr.strip()[:300]}")
        for arch in re.findall(pattern, proc.stdout):
            if key == "ptx":
                arch = arch.replace("sm_", "compute_")
            out[key][arch] = out[key].get(arch, 0) + 1
    return out


def check_ops() -> tuple:
    """(ops, missing CUDA kernels) of the loaded library."""
    import torch

    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("structalign::"))
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    return ops, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib_dir")
    parser.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                        help="TORCH_CUDA_ARCH_LIST of the build (checked against the SASS in the .so)")
    parser.add_argument("--torch-pin", help="the runtime's torch release; the minor version must match")
    args = parser.parse_args(argv)

    so_path = newest_library(args.lib_dir)
    if so_path is None:
        print(f"check-cuda: no structalign/_C*.so under {args.lib_dir}")
        return 1
    import torch

    failures = []
    if args.torch_pin:
        built, pinned = torch.__version__.split("+")[0].split(".")[:2], args.torch_pin.split(".")[:2]
        if built != pinned:
            failures.append(f"built against torch {torch.__version__}, the runtime pins {args.torch_pin}")
        print(f"check-cuda: torch {torch.__version__} (CUDA {torch.version.cuda}); runtime pin {args.torch_pin}: "
              f"{'same minor' if built == pinned else 'DIFFERENT minor'}")
    torch.ops.load_library(so_path)
    ops, missing = check_ops()
    if not ops:
        print(f"check-cuda: {so_path} registered no structalign ops")
        return 1
    for op in ops:
        print(f"  {op}: CPU={torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CPU')} CUDA={op not in missing}")
    if missing:
        failures.append(f"no CUDA kernel for {missing}")

    archs = list_architectures(so_path)
    if "error" in archs:
        print(f"check-cuda: SASS not listed: {archs['error']}")
    else:
        sass = ", ".join(f"{a} ({n} cubin{'s' if n > 1 else ''})" for a, n in sorted(archs["sass"].items())) or "none"
        ptx = ", ".join(sorted(archs["ptx"])) or "none"
        print(f"check-cuda: SASS in {os.path.basename(so_path)}: {sass}; PTX: {ptx} (listed by {archs['cuobjdump']})")
        want_sass, want_ptx = expected_archs(args.archs)
        lacking = sorted(want_sass - set(archs["sass"])) + sorted(want_ptx - set(archs["ptx"]))
        if lacking:
            failures.append(f"TORCH_CUDA_ARCH_LIST={args.archs!r} but the .so lacks {lacking}")
    if failures:
        print("check-cuda: FAILED: " + "; ".join(failures))
        return 1
    print(f"check-cuda: OK, {len(ops)} ops with CUDA kernels in {so_path} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
