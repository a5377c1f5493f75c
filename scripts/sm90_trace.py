"""Summarize the Hopper forward's timeline (a build with MATE_OPS_NVCC_FLAGS=-DMATE_SM90_TRACE).

    python3 scripts/sm90_trace.py D SEQ MASK [fp8]    one prefill call as bench_gpu.py's table
                                                       (B = 16384 / SEQ, H = 2048 / D), then the
                                                       summary of its trace (stderr lines)
SM90_TRACE_RAW=path also writes the raw event lines there. Cycles count from the block's first event
(all roles of a block read the same SM clock). Per block and consumer warpgroup, in SM cycles: how long a work tile takes from its draw to its
stored output, its prologue, how long it waits for Q, for each step's turn (ping-pong) and between
tiles; for the producer, how long it waits for a buffer before a tile's first K; per block, the
tile boundary (warpgroup 1's last P V done to warpgroup 0's next first Q K^T issued). What each event is:
fmha_fwd_sm90.cuh, kTrace*.
"""
import collections
import os
import statistics
import subprocess
import sys

NAMES = {0: "draw", 1: "q", 2: "first_k", 3: "last_v", 4: "first_s", 5: "last_pv", 6: "stored", 7: "ready"}


def run_call(d, seq, mask, fp8):
    code = f"""
import torch
from mate_ops import mha_interface as mi
D, S = {d}, {seq}
B, H = 16384 // S, 2048 // D
q = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
k, v = torch.randn_like(q), torch.randn_like(q)
kw = {{}}
if {fp8}:
    q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    kw = {{n + "_descale": torch.ones(B, H, device="cuda") for n in ("q", "k", "v")}}
for _ in range(2):
    mi.flash_attn_varlen_func(q, k, v, causal={mask == "causal"}, **kw)
torch.cuda.synchronize()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    return [l for l in res.stderr.splitlines() if l.startswith("sm90trace")], res


def summarize(lines):
    # keep the last launch: each launch prints its events block by block, role by role
    ev = collections.defaultdict(list)  # (block, role) -> [(round, event, cycle)]
    for l in lines:
        _, blk, role, rnd, event, cyc = l.split()
        ev[(int(blk), int(role))].append((int(rnd), int(event), int(cyc)))
    absolute = {}  # (block, role) -> {round: {event: cycle}}, the SM clock itself
    last = {}
    for (blk, role), items in sorted(ev.items()):
        # the last launch's events: from the last time round 0's first event appears
        starts = [i for i, (r, e, _) in enumerate(items) if r == 0 and e == 0]
        last[(blk, role)] = items[starts[-1]:] if starts else items
    # one origin per block (its roles share the SM's clock), so producer and consumer cycles compare
    origin = {}
    for (blk, _), items in last.items():
        origin[blk] = min(origin.get(blk, items[0][2]), items[0][2])
    for (blk, role), items in sorted(last.items()):
        absolute[(blk, role)] = collections.defaultdict(dict)
        for r, e, c in items:
            absolute[(blk, role)][r][e] = c
        t0 = origin[blk]
        by_round = collections.defaultdict(dict)
        for r, e, c in items:
            by_round[r][e] = c - t0
        rounds = sorted(by_round)
        name = "producer" if role == 0 else f"consumer {role - 1}"
        print(f"block {blk} {name}: {len(rounds)} work tiles, span {items[-1][2] - t0} cycles")
        if role == 0:
            waits = [by_round[r][2] - by_round[r][0] for r in rounds if 2 in by_round[r] and 0 in by_round[r]]
            if waits:
                print(f"  draw -> first K issued: median {statistics.median(waits):.0f}, max {max(waits)}")
            for r in rounds[:4]:
                print("  round", r, " ".join(f"{NAMES.get(e, str(e))}={c}"
                                             for e, c in sorted(by_round[r].items(), key=lambda x: x[1])))
            continue
        tile = [by_round[r][6] - by_round[r][0] for r in rounds if 6 in by_round[r]]
        qwait = [by_round[r][1] - by_round[r][0] for r in rounds if 1 in by_round[r]]
        prologue = [by_round[r][7] - by_round[r][0] for r in rounds if 7 in by_round[r]]
        gap = [by_round[b][0] - by_round[a][6] for a, b in zip(rounds, rounds[1:]) if 6 in by_round[a]]
        epi = [by_round[r][6] - by_round[r][5] for r in rounds if 6 in by_round[r] and 5 in by_round[r]]
        turn = [by_round[r][64 + t] - by_round[r][32 + t] for r in rounds for t in range(32)
                if 64 + t in by_round[r] and 32 + t in by_round[r]]
        step = [by_round[r][32 + t + 1] - by_round[r][32 + t] for r in rounds for t in range(31)
                if 32 + t + 1 in by_round[r] and 32 + t in by_round[r]]
        for label, xs in (("draw -> stored (work tile)", tile), ("draw -> Q landed", qwait),
                          ("draw -> prologue done", prologue),
                          ("stored -> next draw", gap), ("last P V -> stored (epilogue)", epi),
                          ("step begin -> turn (K/V waits + ping-pong)", turn), ("step -> next step", step)):
            if xs:
                print(f"  {label}: median {statistics.median(xs):.0f}, mean {statistics.mean(xs):.0f}, max {max(xs)}")
        for r in rounds[:3]:
            print("  round", r, " ".join(f"{NAMES.get(e, ('step' if e < 64 else 'turn') + str(e % 32))}={c}"
                                         for e, c in sorted(by_round[r].items(), key=lambda x: x[1])))
    # The tile boundary: from warpgroup 1's last P V of a work tile (done) to warpgroup 0's first
    # Q K^T of the next (issued) -- about how long the tensor cores wait between work tiles (both
    # warpgroups share the block's SM clock).
    for blk in sorted({b for b, _ in absolute}):
        w0, w1 = absolute.get((blk, 1), {}), absolute.get((blk, 2), {})
        gaps = [w0[r + 1][4] - w1[r][5] for r in sorted(w1) if 5 in w1[r] and r + 1 in w0 and 4 in w0[r + 1]]
        if gaps:
            print(f"block {blk} tile boundary (consumer 1's last P V -> consumer 0's next first S): "
                  f"median {statistics.median(gaps):.0f}, mean {statistics.mean(gaps):.0f}, max {max(gaps)}")


if __name__ == "__main__":
    d, seq, mask = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    lines, res = run_call(d, seq, mask, len(sys.argv) > 4 and sys.argv[4] == "fp8")
    if os.environ.get("SM90_TRACE_RAW"):  # the raw events too, for a look beyond the summary
        with open(os.environ["SM90_TRACE_RAW"], "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if not lines:
        print("no trace lines: was the extension built with MATE_OPS_NVCC_FLAGS=-DMATE_SM90_TRACE?")
        print(res.stderr[-2000:])
        sys.exit(1)
    summarize(lines)
