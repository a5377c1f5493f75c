"""GPU benchmark (run on the device machine): our FMHA forward vs torch SDPA's flash
(FlashAttention-2) and cuDNN backends on the same tensors, and decode bandwidth vs the
measured device-to-device copy bandwidth. Prints markdown tables.

    python3 bench/bench_gpu.py [--quick] [--only prefill|fp8|varlen|qv|decode|mla|backward] [--dims 64,128]
                               [--seqlens 512,2048] [--compare LABEL:VAR=VALUE[;VAR=VALUE] ...]

--compare adds a column to the prefill, backward and fp8 tables: ours again, in a child process with those
environment variables (the kernel routes are read once per process), on the same shapes, e.g.
    --compare "mma.sync:MATE_OPS_FMHA_PATH=sm80"     the sm80 kernel instead of the Hopper one
    --compare "mma.sync bwd:MATE_OPS_FMHA_BWD_PATH=sm80"  the mma.sync backward instead of the Hopper one
    --compare "other build:PYTHONPATH=/tmp/site_b"   another build of the package (pip install --target)
Only child columns compare with each other: the main process has read up to 13 % above its own
children on the same kernel, so a change is measured as two --compare columns. The children stay
up for the whole table and take its rows in turns, --rounds times over (default 3, the order of
the children rotated each time, fresh tensors each time); a column shows the median of its rounds,
and a comment under the table gives each column's largest round-to-round spread. Two children of
the same build read up to 14 % apart when each timed a whole table once in turn (session 13), which
is what the rounds are for: a difference smaller than those spreads is not a result.

Prefill: bf16, batch * seqlen = 16k tokens, H * D = 2048 (H = 32/16/8 for D = 64/128/256),
FLOPs = 2 * B * H * S^2 * (D + Dv) (halved when causal); the full table adds D 80, 96,
192 x 128 and fp16 D 128 rows at 2k and 8k tokens. Decode: one query token, H 32 / Hk 8,
D 128, bf16; GB/s counts the K and V bytes of the cache read once.
Backward: the prefill shapes (S 512/2048/8192), the backward alone (ours: fmha_bwd on the
saved out / lse of one forward; SDPA: autograd.grad of one forward's output), FLOPs = 2.5x
the forward's. A backend that cannot run a shape prints n/a.
"""
import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi


def timed(fn, reps=10, inner=5):
    """Median seconds per call: `inner` back-to-back calls between two events, so host
    overhead overlaps device work the way it does in a model."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return sorted(times)[len(times) // 2]


def sdpa_time(backend, q, k, v, causal, **kw):
    try:
        with sdpa_kernel(backend):
            return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw))
    except RuntimeError:
        return float("nan")


def sdpa_bwd_time(backend, q, k, v, dout, causal):
    """Seconds per SDPA backward alone: one forward under `backend`, then autograd.grad of its
    output (graph retained) is timed. q, k, v, dout in SDPA's (B, H, S, D) order."""
    try:
        with sdpa_kernel(backend):
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
            return timed(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    except RuntimeError:
        return float("nan")


def ours_bwd_time(q, k, v, dout, causal, deterministic=False, reps=10):
    """Seconds per torch.ops.mate.fmha_bwd call on the (out, lse) of one forward."""
    try:
        out, lse = torch.ops.mate.fmha_fwd(q, k, v, causal=causal)
        return timed(lambda: torch.ops.mate.fmha_bwd(dout, q, k, v, out, lse, causal=causal,
                                                     deterministic=deterministic), reps=reps)
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg not in _REPORTED:  # once per distinct error, as a comment beside the table
            _REPORTED.add(msg)
            print(f"<!-- ours n/a: {msg} -->")
        return float("nan")


_REPORTED = set()


def na(x, spec=".1f"):
    """x formatted, or n/a for NaN (a backend that could not run)."""
    return "n/a" if x != x else format(x, spec)


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    return 2 * x.numel() / t / 1e9


SEQLENS = None  # --seqlens: the prefill table's sequence lengths (a focused comparison)


def prefill_rows(quick, dims):
    """(B, S, H, D, Dv, causal, dtype name) of the prefill table; SEQLENS (--seqlens) picks the S
    of the D 64 / 128 / 256 rows and leaves the other rows out."""
    seqlens = SEQLENS or ([2048, 8192] if quick else [512, 2048, 8192, 16384])
    rows = [(D, Dv, S, "bf16") for D, Dv in (dims or ([(128, 128)] if quick else [(64, 64), (128, 128), (256, 256)]))
            for S in seqlens]
    if not quick and not dims and not SEQLENS:  # the other head dims and fp16, at 2k and 8k tokens
        rows += [(D, Dv, S, "bf16") for D, Dv in ((80, 80), (96, 96), (192, 128)) for S in (2048, 8192)]
        rows += [(128, 128, S, "fp16") for S in (2048, 8192)]
    return [(16384 // S, S, max(2048 // D, 1), D, Dv, causal, dt) for D, Dv, S, dt in rows for causal in (False, True)]


def prefill_inputs(B, S, H, D, Dv, dt="bf16"):
    dtype = torch.float16 if dt == "fp16" else torch.bfloat16
    q = torch.randn(B, S, H, D, dtype=dtype, device="cuda")
    return q, torch.randn_like(q), torch.randn(B, S, H, Dv, dtype=dtype, device="cuda")


def ours_prefill_time(row, reps=10):
    """Seconds per call of ours on one prefill row (fresh tensors)."""
    B, S, H, D, Dv, causal, dt = row
    q, k, v = prefill_inputs(B, S, H, D, Dv, dt)
    return timed(lambda: mi.flash_attn_varlen_func(q, k, v, causal=causal), reps=reps)


def ours_row_time(table, row, reps=10):
    """Seconds per call of ours on one row of `table` (prefill, backward or fp8), fresh tensors."""
    if table == "backward":
        q, k, v, dout = backward_inputs(*row[:5])
        return ours_bwd_time(q, k, v, dout, row[5], reps=reps)
    if table == "fp8":
        _, (q8, k8, v8), ds = fp8_inputs(*row[:4])
        return ours_fp8_time(q8, k8, v8, ds, row[4], reps=reps)
    return ours_prefill_time(row, reps=reps)


def serve_rows():
    """Child-process mode (--ours-serve): one JSON request per stdin line, {"table", "row"}, one
    JSON reply per request, {"t": seconds}, until stdin closes."""
    for line in sys.stdin:
        req = json.loads(line)
        t = ours_row_time(req["table"], tuple(req["row"]), reps=req.get("reps", 10))
        print(json.dumps({"t": t if t == t else None}), flush=True)


class Columns:
    """The --compare columns: one child process per (label, env), alive for the whole run, each
    timing ours on the rows it is sent. times() sends every row to every child, `rounds` times
    over, rotating the children's order from row to row and round to round, so that a slow
    stretch of the GPU (clocks, temperature) falls on every column alike. A child that dies or
    takes longer than `timeout` seconds for one row (a hung kernel) reads NaN from then on."""

    def __init__(self, compare, argv=None, timeout=600):
        """compare: (label, env) pairs; argv: the child's command (default: this file, --ours-serve)."""
        self.labels = [label for label, _ in compare]
        self.timeout = timeout
        argv = argv or [sys.executable, os.path.abspath(__file__), "--ours-serve"]
        self.procs = [subprocess.Popen(argv, env=dict(os.environ, **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for _, env in compare]
        # a reader thread per pipe: stdout lines into a queue (so a reply can be waited for with a
        # timeout), stderr drained into its last lines (a full pipe would block the child)
        self.replies = [queue.Queue() for _ in self.procs]
        self.stderr_tails = [collections.deque(maxlen=5) for _ in self.procs]
        for proc, q, tail in zip(self.procs, self.replies, self.stderr_tails):
            threading.Thread(target=self._pump, args=(proc.stdout, q.put), daemon=True).start()
            threading.Thread(target=self._pump, args=(proc.stderr, tail.append), daemon=True).start()

    @staticmethod
    def _pump(pipe, sink):
        for line in pipe:
            sink(line)
        sink(None)  # end of the stream

    def _give_up(self, i, why):
        print(f"<!-- child {self.labels[i]} {why}: {[t.strip() for t in self.stderr_tails[i] if t]} -->")
        self.procs[i].kill()

    def ask(self, i, table, row, reps):
        proc = self.procs[i]
        if proc.poll() is not None:
            return float("nan")
        try:
            proc.stdin.write(json.dumps({"table": table, "row": list(row), "reps": reps}) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return float("nan")
        while True:  # the child's own prints (a once-per-error comment) come before its reply
            try:
                line = self.replies[i].get(timeout=self.timeout)
            except queue.Empty:
                self._give_up(i, f"took over {self.timeout} s on {table} {tuple(row)}")
                return float("nan")
            if line is None:
                self._give_up(i, "ended")
                return float("nan")
            if line.startswith('{"t"'):
                t = json.loads(line)["t"]
                return float("nan") if t is None else t

    def times(self, table, rows, rounds):
        """[{row: median seconds}] per column, and each column's largest round-to-round spread."""
        n = len(self.procs)
        samples = [{row: [] for row in rows} for _ in range(n)]
        reps = max(3, 10 // max(rounds, 1))
        for r in range(rounds):
            for j, row in enumerate(rows):
                for k in range(n):
                    i = (k + r + j) % n
                    samples[i][row].append(self.ask(i, table, row, reps))
        medians, spreads = [], []
        for col in samples:
            med, spread = {}, 0.0
            for row, ts in col.items():
                good = sorted(t for t in ts if t == t)
                if good:
                    med[row] = good[len(good) // 2]
                    spread = max(spread, (good[-1] - good[0]) / med[row])
            medians.append(med)
            spreads.append(spread)
        return medians, spreads

    def table_columns(self, table, rows, rounds):
        """[(label, {row: median seconds})] of the columns, and the comment line the table prints under itself."""
        if not self.procs:
            return [], ""
        medians, spreads = self.times(table, rows, rounds)
        note = ("<!-- columns: median of %d rounds; largest round-to-round spread: %s -->"
                % (rounds, ", ".join(f"{label} {s * 100:.0f} %" for label, s in zip(self.labels, spreads))))
        return list(zip(self.labels, medians)), note

    def close(self):
        for proc in self.procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.SubprocessError):
                proc.kill()


def driver_version():
    """The NVIDIA driver's version (nvidia-smi), or "unknown"."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_compare(spec):
    """"LABEL:VAR=VALUE[;VAR=VALUE]" -> (label, {VAR: VALUE})."""
    label, _, assignments = spec.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(";") if a)
    return label, env


def prefill_table(quick, dims=None, columns=None, rounds=3):
    """dims: (D, Dv) pairs; FLOPs = 2 B H S^2 (D + Dv), halved when causal. columns: the --compare
    children (Columns), each a column of ours."""
    others, note = columns.table_columns("prefill", prefill_rows(quick, dims), rounds) if columns else ([], "")
    extra = "".join(f" ours {label} | {label} / cuDNN |" for label, _ in others)
    print("\n| prefill (TFLOP/s) | ours | SDPA flash | SDPA cuDNN | ours / flash | ours / cuDNN |" + extra)
    print("|---|---|---|---|---|---|" + "---|---|" * len(others))
    for row in prefill_rows(quick, dims):
        B, S, H, D, Dv, causal, dt = row
        q, k, v = prefill_inputs(B, S, H, D, Dv, dt)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flops = 2 * B * H * S * S * (D + Dv) * (0.5 if causal else 1.0)
        ours = timed(lambda: mi.flash_attn_varlen_func(q, k, v, causal=causal))
        fl = sdpa_time(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal)
        cu = sdpa_time(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal)
        tf = lambda t: flops / t / 1e12  # noqa: E731
        dims_s = f"D{D}" if D == Dv else f"D{D}/Dv{Dv}"
        cols = ""
        for _, times in others:
            t = times.get(row, float("nan"))
            cols += f" {na(tf(t))} | {na(cu / t, '.2f')} |"
        print(f"| {dt} B{B} S{S} H{H} {dims_s} {'causal' if causal else 'full'} | {tf(ours):.1f} | {na(tf(fl))} | "
              f"{na(tf(cu))} | {na(fl / ours, '.2f')} | {na(cu / ours, '.2f')} |{cols}", flush=True)
        del q, k, v, qt, kt, vt
    if note:
        print(note)


def backward_rows(quick, dims):
    """(B, S, H, D, Dv, causal) of the backward table."""
    seqlens = [2048] if quick else [512, 2048, 8192]
    return [(16384 // S, S, 2048 // D, D, Dv, causal) for D, Dv in (dims or [(64, 64), (128, 128), (256, 256)])
            for S in seqlens for causal in (False, True)]


def backward_inputs(B, S, H, D, Dv):
    q = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(B, S, H, Dv, dtype=torch.bfloat16, device="cuda")
    return q, torch.randn_like(q), v, torch.randn_like(v)


def backward_table(quick, dims=None, columns=None, rounds=3):
    """The backward alone, bf16, prefill shapes; FLOPs = 2.5 x the forward's 2 B H S^2 (D + Dv),
    halved when causal. Ours: fmha_bwd (always deterministic: no atomics); peers: SDPA flash and
    cuDNN. columns: the --compare children (Columns), each a column of ours."""
    others, note = columns.table_columns("backward", backward_rows(quick, dims), rounds) if columns else ([], "")
    extra = "".join(f" ours {label} | {label} / cuDNN |" for label, _ in others)
    print("\n| backward bf16 (TFLOP/s) | ours | SDPA flash | SDPA cuDNN | ours / flash | ours / cuDNN |" + extra)
    print("|---|---|---|---|---|---|" + "---|---|" * len(others))
    for row in backward_rows(quick, dims):
        B, S, H, D, Dv, causal = row
        q, k, v, dout = backward_inputs(B, S, H, D, Dv)
        qt, kt, vt, dt = (x.transpose(1, 2) for x in (q, k, v, dout))
        flops = 2.5 * 2 * B * H * S * S * (D + Dv) * (0.5 if causal else 1.0)
        ours = ours_bwd_time(q, k, v, dout, causal)
        fl = sdpa_bwd_time(SDPBackend.FLASH_ATTENTION, qt, kt, vt, dt, causal)
        cu = sdpa_bwd_time(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, dt, causal)
        tf = lambda t: flops / t / 1e12  # noqa: E731
        dims_s = f"D{D}" if D == Dv else f"D{D}/Dv{Dv}"
        cols = "".join(f" {na(tf(times.get(row, float('nan'))))} | {na(cu / times.get(row, float('nan')), '.2f')} |"
                       for _, times in others)
        print(f"| B{B} S{S} H{H} {dims_s} {'causal' if causal else 'full'} | {na(tf(ours))} | "
              f"{na(tf(fl))} | {na(tf(cu))} | {na(fl / ours, '.2f')} | {na(cu / ours, '.2f')} |{cols}", flush=True)
        del q, k, v, dout, qt, kt, vt, dt
    if note:
        print(note)


def fp8_rows(quick):
    """(B, S, H, D, causal) of the fp8 table."""
    seqlens = [8192] if quick else [2048, 8192]
    return [(16384 // S, S, 2048 // D, D, causal) for D in (128, 256) for S in seqlens for causal in (False, True)]


def fp8_inputs(B, S, H, D):
    """bf16 q, k, v, their fp8 e4m3 casts (the same values, rounded) and unit descales."""
    qb = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
    kb, vb = torch.randn_like(qb), torch.randn_like(qb)
    return (qb, kb, vb), tuple(x.to(torch.float8_e4m3fn) for x in (qb, kb, vb)), torch.ones(B, H, device="cuda")


def ours_fp8_time(q8, k8, v8, ds, causal, reps=10):
    return timed(lambda: mi.flash_attn_varlen_func(q8, k8, v8, causal=causal, q_descale=ds, k_descale=ds,
                                                   v_descale=ds), reps=reps)


def fp8_prefill_table(quick, columns=None, rounds=3):
    """fp8 e4m3 prefill with per-(batch, kv head) descales beside bf16 SDPA on tensors of the
    same shape (what the issue compares against: there is no fp8 SDPA). columns: the --compare
    children (Columns), each a column of ours fp8."""
    others, note = columns.table_columns("fp8", fp8_rows(quick), rounds) if columns else ([], "")
    extra = "".join(f" ours fp8 {label} | {label} / cuDNN bf16 |" for label, _ in others)
    print("\n| prefill fp8 e4m3 (TFLOP/s) | ours fp8 | ours bf16 | SDPA flash bf16 | SDPA cuDNN bf16 | "
          "ours fp8 / cuDNN bf16 |" + extra)
    print("|---|---|---|---|---|---|" + "---|---|" * len(others))
    for row in fp8_rows(quick):
        B, S, H, D, causal = row
        (qb, kb, vb), (q8, k8, v8), ds = fp8_inputs(B, S, H, D)
        flops = 4 * B * H * D * S * S * (0.5 if causal else 1.0)
        t8 = ours_fp8_time(q8, k8, v8, ds, causal)
        tb = timed(lambda: mi.flash_attn_varlen_func(qb, kb, vb, causal=causal))
        qt, kt, vt = (x.transpose(1, 2) for x in (qb, kb, vb))
        fl = sdpa_time(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal)
        cu = sdpa_time(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal)
        tf = lambda t: flops / t / 1e12  # noqa: E731
        cols = "".join(f" {na(tf(times.get(row, float('nan'))))} | {na(cu / times.get(row, float('nan')), '.2f')} |"
                       for _, times in others)
        print(f"| B{B} S{S} H{H} D{D} {'causal' if causal else 'full'} | {tf(t8):.1f} | {tf(tb):.1f} | "
              f"{na(tf(fl))} | {na(tf(cu))} | {na(cu / t8, '.2f')} |{cols}", flush=True)
        del qb, kb, vb, q8, k8, v8, qt, kt, vt
    if note:
        print(note)


def varlen_table():
    """Mixed lengths (ragged q/k) and paged K/V prefill; the peer is SDPA flash on the
    same sequences padded to the longest one (what a padded batch costs)."""
    print("\n| varlen / paged prefill bf16 H16 D128 causal (TFLOP/s of real work) | ours | SDPA flash padded | ratio |")
    print("|---|---|---|---|")
    H, D = 16, 128
    lens = [4096, 512, 2048, 1024, 3000, 300, 1500, 4000]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    T, L = int(cu[-1]), max(lens)
    q = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn_like(q), torch.randn_like(q)
    flops = sum(4 * H * D * n * n * 0.5 for n in lens)
    ours = timed(lambda: mi.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True))
    qp = torch.randn(len(lens), H, L, D, dtype=torch.bfloat16, device="cuda")
    peer = sdpa_time(SDPBackend.FLASH_ATTENTION, qp, qp, qp, True)
    print(f"| varlen {len(lens)} seqs ({T} tokens, max {L}) | {flops / ours / 1e12:.1f} | "
          f"{flops / peer / 1e12:.1f} | {peer / ours:.2f} |", flush=True)
    for P in (16, 64):
        pages_per = [(n + P - 1) // P for n in lens]
        npages = sum(pages_per)
        kc = torch.randn(npages, P, H, D, dtype=torch.bfloat16, device="cuda")
        vc = torch.randn_like(kc)
        perm = torch.randperm(npages, device="cuda", dtype=torch.int32)
        table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32, device="cuda")
        o = 0
        for i, n in enumerate(pages_per):
            table[i, :n] = perm[o:o + n]
            o += n
        seqused = torch.tensor(lens, dtype=torch.int32, device="cuda")
        t = timed(lambda: mi.flash_attn_varlen_func(q, kc, vc, cu, None, L, L, seqused_k=seqused,
                                                    page_table=table, causal=True))
        print(f"| paged P{P} {len(lens)} seqs ({T} tokens) | {flops / t / 1e12:.1f} | {flops / peer / 1e12:.1f} | "
              f"{peer / t:.2f} |", flush=True)


def qv_table():
    """qv (FA3's extra query against V, as in absorbed MLA prefill): D 64 + qv 512, Dv 512.
    The peer is SDPA on the equivalent concatenated head dim ([q, qv] . [k, v], 576 channels),
    with whichever backend can run it (flash and cuDNN stop at 256: the math backend)."""
    print("\n| qv prefill bf16 (TFLOP/s) | ours | SDPA (any backend) on D 576 | ratio |")
    print("|---|---|---|---|")
    for B, S, H in ((4, 1024, 16), (1, 4096, 16)):
        q = torch.randn(B, S, H, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn_like(q)
        qv = torch.randn(B, S, H, 512, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(qv)
        flops = 2 * B * H * S * S * (64 + 512 + 512) * 0.5
        scale = (64 + 512) ** -0.5
        ours = timed(lambda: mi.flash_attn_varlen_func(q, k, v, causal=True, qv=qv, softmax_scale=scale), reps=3)
        qc, kc = torch.cat([q, qv], -1).transpose(1, 2), torch.cat([k, v], -1).transpose(1, 2)
        try:
            peer = timed(lambda: F.scaled_dot_product_attention(qc, kc, v.transpose(1, 2), is_causal=True,
                                                                scale=scale), reps=3)
        except RuntimeError:  # e.g. out of memory in the math backend
            peer = float("nan")
        print(f"| B{B} S{S} H{H} D64 + qv512 causal | {na(flops / ours / 1e12)} | {na(flops / peer / 1e12)} | "
              f"{na(peer / ours, '.2f')} |", flush=True)
        del q, k, qv, v, qc, kc


def decode_table(quick):
    bw = copy_bandwidth()
    print(f"\ndevice-to-device copy: {bw:.0f} GB/s (read + write of 1 GiB)")
    print("\n| decode bf16 H32/8 D128, 1 query token (GB/s of K+V) | ours | SDPA (dense cache) | ours / copy |")
    print("|---|---|---|---|")
    Hk, Hq, D = 8, 32, 128
    cases = [(32, 4096), (128, 8192)] if quick else [(32, 4096), (32, 8192), (128, 4096), (128, 8192)]
    for B, Sk in cases:
        gb = 2 * B * Sk * Hk * D * 2 / 1e9
        q = torch.randn(B, 1, Hq, D, dtype=torch.bfloat16, device="cuda")
        lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
        kd = torch.randn(B, Sk, Hk, D, dtype=torch.bfloat16, device="cuda")
        vd = torch.randn_like(kd)
        t = timed(lambda: mi.flash_attn_with_kvcache(q, kd, vd, cache_seqlens=lens))
        peer = sdpa_time(SDPBackend.FLASH_ATTENTION, q.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                         False, enable_gqa=True)
        if peer != peer:  # flash without GQA support in this torch: let SDPA pick
            peer = timed(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kd.transpose(1, 2),
                                                                vd.transpose(1, 2), enable_gqa=True))
        print(f"| dense B{B} Sk{Sk} | {gb / t:.0f} | {gb / peer:.0f} | {gb / t / bw:.2f} |", flush=True)
        del kd, vd
        for P in (16, 64):
            pages = B * Sk // P
            kc = torch.randn(pages, P, Hk, D, dtype=torch.bfloat16, device="cuda")
            vc = torch.randn_like(kc)
            table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(B, Sk // P)
            t = timed(lambda: mi.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, page_table=table))
            print(f"| paged P{P} B{B} Sk{Sk} | {gb / t:.0f} | | {gb / t / bw:.2f} |", flush=True)
            del kc, vc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["prefill", "fp8", "varlen", "qv", "decode", "mla", "backward"])
    ap.add_argument("--dims", help="prefill and backward head dims, e.g. 128,256 or 192x128 (D x Dv)")
    ap.add_argument("--seqlens", help="prefill: only these sequence lengths of the D 64 / 128 / 256 rows, e.g. 512,2048")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL:VAR=VALUE[;VAR=VALUE]",
                    help="prefill, backward and fp8: a column of ours in a child process with these environment variables")
    ap.add_argument("--rounds", type=int, default=3, help="--compare: times each child takes every row (median shown)")
    ap.add_argument("--ours-serve", action="store_true", help=argparse.SUPPRESS)  # a --compare child
    args = ap.parse_args()
    if args.ours_serve:
        serve_rows()
        return
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, driver {driver_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    dims = None
    if args.dims:
        dims = [tuple(int(x) for x in d.split("x")) if "x" in d else (int(d), int(d)) for d in args.dims.split(",")]
    compare = [parse_compare(c) for c in args.compare]
    global SEQLENS
    if args.seqlens:
        SEQLENS = [int(x) for x in args.seqlens.split(",")]
    columns = Columns(compare) if compare else None
    if args.only in (None, "prefill"):
        prefill_table(args.quick, dims, columns, args.rounds)
    if args.only in (None, "backward"):
        backward_table(args.quick, dims, columns, args.rounds)
    if args.only in (None, "fp8"):
        fp8_prefill_table(args.quick, columns, args.rounds)
    if args.only in (None, "varlen"):
        varlen_table()
    if args.only in (None, "qv"):
        qv_table()
    if args.only in (None, "decode"):
        decode_table(args.quick)
    if args.only in (None, "mla"):
        import bench_mla  # bench/ is on sys.path when this file runs as a script
        bench_mla.main(args.quick)
    if columns:
        columns.close()


if __name__ == "__main__":
    main()
