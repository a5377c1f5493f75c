"""Where a Hopper kernel's warps wait, per role and per instruction, from Nsight Compute's warp
samples (the CSV `STALLS=1 bash scripts/profile_gpu.sh` writes on the GPU machine).

    python3 scripts/stall_ledger.py stalls_d128_s512_full.csv [--top 30] [--tiles N]

Splits the kernel's SASS as scripts/sass_roles.py does (the code between `setmaxnreg`
instructions: entry, consumers, producer warpgroup) and the consumers' part at their steady-state
step loop (the smallest loop holding a wgmma): samples before it (the work tile's prologue and first
step), in it, and after it (the last step and the epilogue), with the three commonest stall reasons
of each; then the instructions with the most samples. --tiles N (work tiles x consumer warps, e.g.
2048 x 8) also prints the instructions each part executes per warp and work tile.
Waits for an mbarrier show on the branch after its SYNCS.PHASECHK (long scoreboard), the wait for a
wgmma on its WARPGROUP.DEPBAR, the wait for a ping-pong turn on the instruction after BAR.SYNC.

--lines SASS: the same kernel compiled here with `-lineinfo` and disassembled with `nvdisasm -g -c`
(nvcc 13.0 on both machines gives the same SASS: session 12 matched all 5,408 instructions) puts
source lines on the consumers' code outside the step loop: executed instructions per warp and tile
and samples per line, which is what a work tile's prologue and epilogue cost, line by line.
"""
import argparse
import collections
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_roles import find_loops, opcode, role_parts, step_loop  # noqa: E402  (one reading of roles and loops)

SAMPLES = "Warp Stall Sampling (All Samples)"


def load(path):
    rows = list(csv.reader(open(path, newline="")))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header, data = rows[start], rows[start + 1:]
    col = {h: i for i, h in enumerate(header)}
    base = int(data[0][col["Address"]], 16)

    def num(r, h):
        v = r[col[h]].replace(",", "") if h in col else ""
        return float(v) if v else 0.0

    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in data:
        src = r[col["Source"]].strip()
        out.append({"addr": int(r[col["Address"]], 16) - base, "src": src, "op": opcode(src) if src else "",
                    "samples": num(r, SAMPLES), "executed": num(r, "Instructions Executed"),
                    "reasons": {h[6:]: num(r, h) for h in reasons if num(r, h)}})
    return out, base


def source_lines(path):
    """{address: (file name, line)} of an `nvdisasm -g -c` listing of one kernel."""
    where, out = None, {}
    for line in open(path):
        m = re.match(r'\s*//## File "(.*)", line (\d+)', line)
        if m:
            where = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and where:
            out[int(m.group(1), 16)] = where
    return out


def by_line(rows, lines, label, tiles, top=15):
    executed, samples = collections.Counter(), collections.Counter()
    for r in rows:
        key = lines.get(r["addr"])
        if key:
            executed[key] += r["executed"] / max(tiles, 1)
            samples[key] += r["samples"]
    print(f"\n{label}: source lines by instructions executed per warp and tile (samples)")
    for key, n in executed.most_common(top):
        print(f"  {n:7.1f}  {samples[key]:6.0f}  {key[0]}:{key[1]}")


def summary(rows, label, total, tiles):
    samples = sum(r["samples"] for r in rows)
    reasons = collections.Counter()
    for r in rows:
        reasons.update(r["reasons"])
    per_tile = f", {sum(r['executed'] for r in rows) / tiles:.0f} instructions per warp and tile" if tiles else ""
    top = ", ".join(f"{k} {v:.0f}" for k, v in reasons.most_common(3))
    print(f"{label:34s} {samples:7.0f} samples {100 * samples / max(total, 1):5.1f} %{per_tile}   ({top})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--tiles", type=float, default=0, help="work tiles x consumer warps (per-tile counts)")
    ap.add_argument("--lines", help="nvdisasm -g -c listing of the same kernel (source lines)")
    args = ap.parse_args()
    lines = source_lines(args.lines) if args.lines else None
    rows, base = load(args.csv)
    total = sum(r["samples"] for r in rows)
    sass = [(r["addr"] + base, r["src"]) for r in rows]  # absolute, as the branch targets are
    print(f"{total:.0f} samples")
    for role, a, b in role_parts(sass):
        part = rows[a:b]
        if not part:
            continue
        summary(part, role, total, 0)
        if role != "consumers":
            continue
        loop = step_loop(sass[a:b], find_loops(sass[a:b]))
        if loop is None:
            continue
        first, last = loop[0] - base, loop[1] - base
        summary([r for r in part if r["addr"] < first], "  before the step loop", total, args.tiles)
        summary([r for r in part if first <= r["addr"] <= last], f"  step loop {first:#x}..{last:#x}", total,
                args.tiles)
        summary([r for r in part if r["addr"] > last], "  after it", total, args.tiles)
        if lines:
            by_line([r for r in part if r["addr"] < first], lines, "before the step loop", args.tiles)
            by_line([r for r in part if r["addr"] > last], lines, "after the step loop", args.tiles)
    print(f"\nthe {args.top} instructions with the most samples (address, % of all, executed, reasons):")
    for r in sorted(rows, key=lambda r: -r["samples"])[:args.top]:
        top = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1])[:3])
        print(f"  {r['addr']:#07x} {100 * r['samples'] / max(total, 1):5.1f} % {r['executed']:9.0f}  {r['src'][:64]:64s} {top}")


if __name__ == "__main__":
    main()
