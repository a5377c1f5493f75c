#!/usr/bin/env python3
"""Context-parallel check on two GPUs with NCCL: one command, prints PASS or FAIL.

    python3 scripts/cp_gpu_check.py            # 2 GPUs (cuda:0, cuda:1), NCCL, NCCL_NVLS_ENABLE=0

Runs tests/cp_check.py's cases (the CPU suite's tests/test_distributed.py runs the same
with gloo): every rank's share of the output and lse of mate_ops.distributed.
context_parallel_attention, methods "gather_q", "gather_kv" and "ring", against the oracle on the whole
sequences; prints the largest errors over both ranks per case.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off

import torch  # noqa: E402


def main() -> int:
    world = int(os.environ.get("CP_WORLD", "2"))
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        print(f"FAIL: needs {world} CUDA GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        return 1
    import cp_check
    print(f"context parallel over {world} GPUs ({torch.cuda.get_device_name(0)}), NCCL, "
          f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}")
    start = time.time()
    try:
        cp_check.spawn(world, "nccl", "cuda", report=True, bad_inputs=True, timeout_s=600)
    except Exception as e:  # a worker's assertion or a hang
        print(f"FAIL after {time.time() - start:.0f} s: {e}")
        return 1
    print(f"PASS ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
