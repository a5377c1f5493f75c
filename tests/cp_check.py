"""Context-parallel checks shared by tests/test_distributed.py (gloo, CPU) and
scripts/cp_gpu_check.py (NCCL, GPUs): every rank runs the same cases and compares its
share of the output with the oracle run on the whole sequences in one process.
"""
import datetime
import os
import re

import torch
import torch.distributed as dist

import mate_ops  # noqa: F401
from mate_ops import distributed as mdist
from mate_ops.testing import fmha_ref

# name -> case; lengths are the whole sequences (some shorter than the world size, so some
# ranks own no token of them)
CASES = {
    "causal_gqa_varlen": dict(lq=[13, 5, 8, 2], H=4, Hk=2, causal=True),
    "full_gqa_varlen": dict(lq=[13, 5, 8, 2], H=4, Hk=2, causal=False),
    "causal_prefix_lq_lt_lk": dict(lq=[5, 3, 1], lk=[17, 9, 6], H=4, Hk=1, causal=True),
    "causal_lq_gt_lk": dict(lq=[9, 4], lk=[4, 4], H=2, Hk=2, causal=True),
    "full_d_ne_dv_softcap": dict(lq=[11, 6], H=2, Hk=1, D=32, Dv=48, causal=False, softcap=3.0),
    "causal_sink": dict(lq=[10, 7], H=4, Hk=2, causal=True, sink=True),
    "causal_bf16": dict(lq=[21, 9], H=4, Hk=2, causal=True, dtype=torch.bfloat16),
    "window_softcap": dict(lq=[19, 8], H=4, Hk=2, causal=True, window=(4, 0), softcap=2.0, methods=("gather_q",)),
    "local_window_chunk": dict(lq=[23, 12], H=2, Hk=2, causal=False, window=(5, 3), chunk=8, methods=("gather_q",)),
}
METHODS = ("gather_q", "gather_kv", "ring")


def _data(case, seed):
    """The whole sequences' q, k, v (fp32 master copies, the same on every rank) and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    lq = case["lq"]
    lk = case.get("lk", lq)
    D, Dv = case.get("D", 64), case.get("Dv", case.get("D", 64))
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(lq), case["H"], D, generator=g)
    k = torch.randn(sum(lk), case["Hk"], D, generator=g)
    v = torch.randn(sum(lk), case["Hk"], Dv, generator=g)
    sink = torch.randn(case["H"], generator=g) if case.get("sink") else None
    return q, k, v, cu(lq), cu(lk), sink


def run_case(name, case, method, device, group=None):
    """This rank's max |out - ref| and |lse - ref| for one case; raises AssertionError past tolerance."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, cu_q, cu_k, sink = _data(case, seed=len(name))
    dtype = case.get("dtype", torch.float32)
    opts = dict(causal=case["causal"], window_size=case.get("window", (-1, -1)), softcap=case.get("softcap", 0.0),
                attention_chunk=case.get("chunk", 0))
    ref_out, ref_lse = fmha_ref(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                learnable_sink=sink, **opts)
    rows = mdist.shard_rows(cu_q, world, rank)
    mine = lambda x, c: mdist.shard(x, c, world, rank).to(device=device, dtype=dtype)  # noqa: E731
    out, lse = mdist.context_parallel_attention(
        mine(q, cu_q), mine(k, cu_k), mine(v, cu_k), cu_q.to(device), cu_k.to(device), group,
        learnable_sink=None if sink is None else sink.to(device), method=method, **opts)
    want_out, want_lse = ref_out[rows].float(), ref_lse[:, rows].float()
    assert out.dtype == dtype and out.shape == want_out.shape and lse.shape == want_lse.shape, \
        (out.dtype, out.shape, lse.shape)
    atol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: one rounding of the output
    out, lse = out.float().cpu(), lse.float().cpu()
    err_out = (out - want_out).abs().max().item() if out.numel() else 0.0
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}/{method}: -inf rows differ"
    err_lse = (lse - want_lse)[finite].abs().max().item() if finite.any() else 0.0
    assert err_out <= atol and err_lse <= 1e-4, f"{name}/{method} rank {rank}: out err {err_out}, lse err {err_lse}"
    return err_out, err_lse


def bad_input_cases(device):
    """(name, kwargs changes, exception, message regex) for context_parallel_attention."""
    return [
        ("q_2d", dict(q=lambda a: a["q"][:, 0]), ValueError, r"q must be a 3-D tensor"),
        ("q_rows", dict(q=lambda a: a["q"][1:]), ValueError, r"q has \d+ rows but rank \d of 2 owns"),
        ("k_rows", dict(k=lambda a: a["k"][1:], v=lambda a: a["v"][1:]), ValueError, r"k has \d+ rows"),
        ("v_rows", dict(v=lambda a: a["v"][1:]), ValueError, r"v must have k's rows"),
        ("cu_q_int64", dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), ValueError,
         r"cu_seqlens_q must be a 1-D int32"),
        ("cu_q_decreasing", dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].flip(0)), ValueError,
         r"cu_seqlens_q must start at 0 and be non-decreasing"),
        ("cu_k_batch", dict(cu_seqlens_k=lambda a: a["cu_seqlens_k"][:-1]), ValueError, r"cu_seqlens_k has 1 sequences"),
        ("method", dict(method=lambda a: "ulysses"), ValueError, r"method must be one of"),
        ("ring_window", dict(method=lambda a: "ring", window_size=lambda a: (3, 0)), ValueError,
         r"method='ring' supports causal or full attention only"),
        ("gather_kv_chunk", dict(method=lambda a: "gather_kv", attention_chunk=lambda a: 4), ValueError,
         r"method='gather_kv' supports causal or full attention only"),
        ("ring_kv_dtypes", dict(method=lambda a: "ring", v=lambda a: a["v"].double()), ValueError,
         r"needs k and v of one dtype"),
        ("window_pair", dict(window_size=lambda a: (1, 2, 3)), ValueError, r"window_size must be a \(left, right\)"),
    ]


def run_bad_inputs(device, group=None):
    """Every bad input raises its message on every rank, before any collective."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, cu_q, cu_k, _ = _data(dict(lq=[7, 4], H=2, Hk=1, D=16), seed=3)
    base = dict(q=mdist.shard(q, cu_q, world, rank).to(device), k=mdist.shard(k, cu_k, world, rank).to(device),
                v=mdist.shard(v, cu_k, world, rank).to(device), cu_seqlens_q=cu_q.to(device),
                cu_seqlens_k=cu_k.to(device), causal=True)
    for name, changes, exc, pattern in bad_input_cases(device):
        kw = dict(base)
        kw.update({key: f(base) for key, f in changes.items()})
        try:
            mdist.context_parallel_attention(group=group, **kw)
        except exc as e:
            assert re.search(pattern, str(e)), f"{name}: message {str(e)!r} does not match {pattern!r}"
        else:
            raise AssertionError(f"{name}: no {exc.__name__} raised")
    mdist.context_parallel_attention(group=group, **base)  # the ranks are still in step


def worker(rank, world, port, backend, device_kind, case_names, methods, bad_inputs, report, err_dir):
    """mp.spawn target: run the cases; a failure's traceback also goes to ``err_dir``/rank<r>.txt,
    so that the report shows the failing rank's error, not a peer's "connection reset"."""
    try:
        _work(rank, world, port, backend, device_kind, case_names, methods, bad_inputs, report)
    except BaseException:
        import traceback
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _work(rank, world, port, backend, device_kind, case_names, methods, bad_inputs, report):
    torch.set_num_threads(1)  # W processes share the machine's cores
    device = torch.device(device_kind, rank) if device_kind != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        worst = {}
        for name in case_names:
            case = CASES[name]
            for method in methods:
                if method in case.get("methods", METHODS):
                    errs = torch.tensor(run_case(name, case, method, device), dtype=torch.float64, device=device)
                    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
                    worst[f"{name}/{method}"] = errs.tolist()
        if bad_inputs:
            run_bad_inputs(device)
        if rank == 0 and report:
            for key, (eo, el) in worst.items():
                print(f"  {key:40s} max|out err| {eo:.2e}  max|lse err| {el:.2e}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    """A TCP port on 127.0.0.1 that is free now (for the group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, backend, device_kind, case_names=tuple(CASES), methods=METHODS, bad_inputs=False, report=False,
          timeout_s=180.0):
    """Run ``worker`` on ``world`` processes; raise on a failure, kill everything past ``timeout_s``."""
    import glob
    import tempfile
    import time

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as err_dir:
        ctx = mp.spawn(worker, args=(world, free_port(), backend, device_kind, tuple(case_names), tuple(methods),
                                     bad_inputs, report, err_dir), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"context-parallel check on {world} processes did not finish in "
                                       f"{timeout_s:.0f} s")
        except Exception as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            errors = "".join(f"\n--- {os.path.basename(f)}:\n" + open(f).read()
                             for f in sorted(glob.glob(os.path.join(err_dir, "rank*.txt"))))
            raise AssertionError(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                                 f"{errors}") from e
