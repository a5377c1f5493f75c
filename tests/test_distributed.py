"""mate_ops.distributed: context-parallel attention over torch.distributed.

The real test spawns 2 and 3 processes (gloo, CPU, 127.0.0.1), each holding its interleaved
share of q/k/v (token t on rank t mod W), and compares every rank's output and lse with the
oracle on the whole sequences: causal and not, varlen (some sequences shorter than W), GQA,
Lq != Lk, D != Dv, softcap, sinks, bf16, and (gather_q only) windows and chunks; all three
methods. A hang fails the test after a time limit instead of blocking the suite. The same
check runs on two GPUs with NCCL when they exist (scripts/cp_gpu_check.py runs it alone).
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

from mate_ops import distributed as mdist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cp_check  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_gloo(world):
    cp_check.spawn(world, "gloo", "cpu", bad_inputs=(world == 2), timeout_s=240)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="needs two CUDA GPUs and NCCL")
def test_context_parallel_nccl_two_gpus(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    cp_check.spawn(2, "nccl", "cuda", timeout_s=300)


def test_needs_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        mdist.context_parallel_attention(q, q, q, cu, cu)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_partition_the_sequences(world):
    lens = [0, 1, 7, 4, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(sum(lens), 3)
    rows = [mdist.shard_rows(cu, world, r) for r in range(world)]
    assert sorted(torch.cat(rows).tolist()) == list(range(sum(lens)))  # every token exactly once
    for r in range(world):
        local_cu = mdist.shard_cu_seqlens(cu, world, r)
        assert local_cu.dtype == torch.int32 and local_cu[-1] == rows[r].numel()
        part = mdist.shard(x, cu, world, r)
        for b in range(len(lens)):  # sequence b's share: its tokens r, r + W, ... in order
            a, e = int(cu[b]), int(cu[b + 1])
            torch.testing.assert_close(part[int(local_cu[b]):int(local_cu[b + 1])], x[a:e][r::world], rtol=0, atol=0)


@pytest.mark.parametrize("args, pattern", [
    ((torch.tensor([0, 3], dtype=torch.int64), 2, 0), "cu_seqlens must be a 1-D int32"),
    ((torch.tensor([0, 3], dtype=torch.int32), 0, 0), "world_size >= 1"),
    ((torch.tensor([0, 3], dtype=torch.int32), 2, 2), "0 <= rank < world_size"),
    ((torch.tensor([1, 3], dtype=torch.int32), 2, 0), "must start at 0"),
])
def test_shard_rows_bad_input(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        mdist.shard_rows(*args)
