"""scripts/stall_ledger.py (Nsight Compute's warp samples per role and step loop) on a small
Nsight-Compute-shaped CSV: the roles split at setmaxnreg, the step loop is the smallest loop that
holds a wgmma, and the samples of each part add up (a GPU is not needed to read the CSV)."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASE = 0x7F0000000000
# (offset, SASS, samples, executed, long_sb, wait)
ROWS = [
    (0x0000, "BAR.SYNC.DEFER_BLOCKING 0x0", 1, 12, 0, 1),
    (0x0100, "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", 0, 8, 0, 0),
    (0x0200, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x30000], R2", 2, 8, 0, 2),
    (0x0300, "@!P0  BRA 0x%x" % (BASE + 0x4000), 40, 8, 40, 0),  # a forward branch: the retry, not a loop
    (0x0400, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT", 5, 8, 0, 5),
    (0x0500, "FMNMX R0, R24, R25, !PT", 30, 64, 0, 30),
    (0x0600, "MUFU.EX2 R1, R0", 20, 64, 0, 20),
    (0x0700, "@P1  BRA 0x%x" % (BASE + 0x400), 3, 64, 0, 3),  # the step loop 0x400..0x700
    (0x0800, "STG.E desc[UR24][R8.64], R12", 7, 8, 0, 7),
    (0x0900, "@!P2  BRA 0x%x" % (BASE + 0x200), 1, 8, 0, 1),  # the work-tile loop around it
    (0x0a00, "USETMAXREG.DEALLOC.CTAPOOL 0x18", 0, 4, 0, 0),
    (0x0b00, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R2+UR6+0x30020], R0", 0, 4, 0, 0),
    (0x0c00, "@!P0  BRA 0x%x" % (BASE + 0x4000), 11, 4, 11, 0),
]


def write_csv(path):
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Kernel Name", "fmha_sm90_kernel"])
        w.writerow(header)
        for off, src, samples, executed, long_sb, wait in ROWS:
            w.writerow([hex(BASE + off), src, samples, executed, long_sb, wait, 0])


def test_stall_ledger_splits_roles_and_the_step_loop(tmp_path):
    path = tmp_path / "stalls.csv"
    write_csv(path)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "stall_ledger.py"), str(path), "--tiles", "8",
                          "--top", "3"], capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    total = sum(r[2] for r in ROWS)
    assert lines[0] == f"{total} samples"

    def samples(label):
        line = next(l for l in lines if l.strip().startswith(label))
        return float(line.split("samples")[0].split()[-1])

    assert samples("entry") == 1
    assert samples("consumers") == sum(r[2] for r in ROWS[1:10])
    assert samples("producer warpgroup") == 11
    assert samples("before the step loop") == 42  # the retry's 40 included
    assert samples("step loop 0x400..0x700") == 58
    assert samples("after it") == 8
    step = next(l for l in lines if "step loop 0x400..0x700" in l)
    assert "25 instructions per warp and tile" in step  # (8 + 64 * 3) / 8
    top = lines[lines.index(next(l for l in lines if l.startswith("the 3 instructions"))) + 1:]
    assert top[0].split()[0] == "0x00300" and "long_sb 40" in top[0]


def test_stall_ledger_puts_source_lines_on_the_tile_boundary(tmp_path):
    path, listing = tmp_path / "stalls.csv", tmp_path / "kernel.sass"
    write_csv(path)
    text = []
    for off, src, *_ in ROWS:
        line = 10 if off < 0x400 else 20 if off <= 0x700 else 30  # prologue, step, epilogue
        text += [f'\t//## File "/src/kernel.cuh", line {line}', f"        /*{off:04x}*/                   {src} ;"]
    listing.write_text("\n".join(text) + "\n")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "stall_ledger.py"), str(path), "--tiles", "8",
                          "--lines", str(listing)], capture_output=True, text=True, check=True)
    out = res.stdout
    before = out[out.index("before the step loop: source lines"):out.index("after the step loop: source lines")]
    after = out[out.index("after the step loop: source lines"):out.index("producer warpgroup")]
    # before the loop: the consumers' rows at 0x100..0x300 (executed 8 + 8 + 8 per 8 tiles, 42 samples)
    assert "3.0      42  kernel.cuh:10" in before and "kernel.cuh:20" not in before
    assert "2.0       8  kernel.cuh:30" in after
