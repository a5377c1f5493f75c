"""The README's main job (examples/demo.py, what scripts/demo.sh runs after set-up) runs to
the end on the CPU and reports every result within its tolerance."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_and_agrees_with_the_oracle():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("worst error") and last.endswith("OK"), res.stdout[-3000:]
    for section in ("FMHA forward", "flash_attn_with_kvcache", "MLA", "backward", "torch.compile"):
        assert section in res.stdout, f"the demo no longer shows {section}"
