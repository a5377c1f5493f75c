"""bench/bench_gpu.py's --compare columns (Columns): the parent side of the protocol, against a
stand-in child that answers with known times, so it runs without a GPU. Checked: every child
gets every row every round, the order of the children rotates, a column shows the median of its
rounds and the largest round-to-round spread, and a child that dies reads NaN instead of hanging."""
import json
import math
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
bench_gpu = pytest.importorskip("bench_gpu")

# The stand-in: replies t = BASE * (1 + round index / 10) for each request, logs (label, row) to LOG.
CHILD = textwrap.dedent('''
    import json, os, sys
    base, log = float(os.environ["BASE"]), os.environ["LOG"]
    die_after = int(os.environ.get("DIE_AFTER", "-1"))
    hang_after = int(os.environ.get("HANG_AFTER", "-1"))
    seen = {}
    for n, line in enumerate(sys.stdin):
        if n == die_after:
            sys.exit(3)
        if n == hang_after:
            import time
            time.sleep(3600)
        print("x" * 200, file=sys.stderr, flush=True)  # chatter on stderr: must not fill the pipe
        req = json.loads(line)
        row = tuple(req["row"])
        k = seen.get(row, 0)
        seen[row] = k + 1
        with open(log, "a") as f:
            f.write(json.dumps([os.environ["LABEL"], req["table"], list(row), req["reps"]]) + "\\n")
        print("<!-- a comment the parent skips -->", flush=True)
        print(json.dumps({"t": base * (1 + k / 10)}), flush=True)
''')


def columns(tmp_path, specs, timeout=600):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    log = tmp_path / "log.jsonl"
    compare = [(label, dict(env, LABEL=label, LOG=str(log))) for label, env in specs]
    return bench_gpu.Columns(compare, argv=[sys.executable, str(child)], timeout=timeout), log


def test_every_row_every_round_rotated_median_and_spread(tmp_path):
    cols, log = columns(tmp_path, [("A", {"BASE": "1.0"}), ("B", {"BASE": "2.0"}), ("C", {"BASE": "4.0"})])
    rows = [(1, 512, 8, 256, 256, False, "bf16"), (1, 512, 8, 256, 256, True, "bf16")]
    try:
        got, note = cols.table_columns("prefill", rows, rounds=3)
    finally:
        cols.close()
    assert [label for label, _ in got] == ["A", "B", "C"]
    for (label, times), base in zip(got, (1.0, 2.0, 4.0)):
        for row in rows:  # rounds read base, 1.1 base, 1.2 base: the median is the middle one
            assert math.isclose(times[row], 1.1 * base), (label, row, times)
    assert "median of 3 rounds" in note and "A 18 %" in note and "C 18 %" in note  # (1.2 - 1.0) / 1.1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3 * 2 * 3 and all(c[1] == "prefill" and c[3] == 3 for c in calls)
    firsts = [calls[i][0] for i in range(0, len(calls), 3)]  # who went first for each (round, row)
    assert firsts == ["A", "B", "B", "C", "C", "A"]


def test_a_dead_child_reads_nan(tmp_path):
    cols, _ = columns(tmp_path, [("ok", {"BASE": "1.0"}), ("dies", {"BASE": "1.0", "DIE_AFTER": "1"})])
    rows = [(1,), (2,)]
    try:
        got, note = cols.table_columns("fp8", rows, rounds=2)
    finally:
        cols.close()
    ok, dies = dict(got)["ok"], dict(got)["dies"]
    assert set(ok) == set(rows)
    assert list(dies) == [(1,)]  # only its first answer; the rest read NaN and are left out
    assert "dies" in note


def test_a_hung_child_times_out_and_reads_nan(tmp_path):
    cols, _ = columns(tmp_path, [("ok", {"BASE": "1.0"}), ("hangs", {"BASE": "1.0", "HANG_AFTER": "1"})], timeout=5)
    rows = [(1,), (2,), (3,)]
    try:
        got, _ = cols.table_columns("prefill", rows, rounds=1)
    finally:
        cols.close()
    assert set(dict(got)["ok"]) == set(rows)
    assert list(dict(got)["hangs"]) == [(1,)]


def test_a_chatty_child_does_not_block(tmp_path):
    # 400 requests x 200 bytes of stderr each: past a pipe's 64 KB unless something drains it
    cols, _ = columns(tmp_path, [("chatty", {"BASE": "1.0"})], timeout=30)
    rows = [(n,) for n in range(400)]
    try:
        got, _ = cols.table_columns("backward", rows, rounds=1)
    finally:
        cols.close()
    assert len(dict(got)["chatty"]) == 400


def test_no_columns_without_compare():
    cols = bench_gpu.Columns([])
    assert cols.table_columns("prefill", [(1,)], rounds=3) == ([], "")
    cols.close()
