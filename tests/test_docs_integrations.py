"""docs/integrations.md: every ```python block is a complete script that must run as written.

Each block runs in its own interpreter (the distributed one spawns processes, which needs a
real __main__ module), with this checkout first on PYTHONPATH and a time limit.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "integrations.md")


def _blocks():
    text = open(DOC, encoding="utf-8").read()
    blocks, heading = [], "top"
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", text, flags=re.M | re.S):
        if m.group(1):
            heading = re.sub(r"\W+", "_", m.group(1)).strip("_").lower()[:40]
        else:
            blocks.append(pytest.param(m.group(2), id=f"{heading}_{len(blocks)}"))
    return blocks


BLOCKS = _blocks()


def test_doc_has_the_three_sections():
    assert len(BLOCKS) == 3, [b.id for b in BLOCKS]


@pytest.mark.parametrize("code", BLOCKS)
def test_doc_snippet_runs(code, tmp_path):
    if "transformers" in code:
        pytest.importorskip("transformers")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
