"""Load a CUDA build of structalign._C (made by `make check-cuda`) and check that every op has a CUDA kernel.

    python tools/check_cuda_build.py build/check-cuda/lib
"""
import glob
import os
import sys

import torch


def main(lib_dir: str) -> int:
    found = glob.glob(os.path.join(lib_dir, "structalign", "_C*.so"))
    if not found:
        print(f"check-cuda: no structalign/_C*.so under {lib_dir}")
        return 1
    torch.ops.load_library(found[0])
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("structalign::"))
    if not ops:
        print("check-cuda: the library registered no structalign ops")
        return 1
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    for op in ops:
        print(f"  {op}: CPU={torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CPU')} "
              f"CUDA={op not in missing}")
    if missing:
        print(f"check-cuda: FAILED, no CUDA kernel for {missing}")
        return 1
    print(f"check-cuda: OK, {len(ops)} ops with CUDA kernels in {found[0]} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
