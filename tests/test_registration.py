"""Every torch.ops.mate op has a CPU kernel, a fake kernel, tests and docs (op coverage)."""
import pathlib

import pytest
import torch
from torch._library.simple_registry import singleton

import mate_ops  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mate::"))


def _text(*parts):
    files = []
    for part in parts:
        p = ROOT / part
        files += [p] if p.is_file() else list(p.rglob("*.py")) + list(p.rglob("*.md"))
    return "\n".join(f.read_text(errors="ignore") for f in files)


def test_ops_registered():
    assert len(OPS) >= 5, OPS


@pytest.mark.parametrize("name", OPS)
def test_op_has_cpu_and_fake_kernel_tests_and_docs(name):
    short = name.split("::")[1]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
    assert singleton.find(name).fake_impl.kernel is not None, f"{name} has no fake kernel"
    tests = _text("tests")
    assert tests.count(short) >= 2, f"{short} is not exercised by the tests"
    assert short in _text("docs", "README.md"), f"{short} is not documented"
