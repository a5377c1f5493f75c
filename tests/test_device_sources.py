"""The device kernels of csrc/musa compile with a plain nvcc (no torch headers), for sm_80 and
sm_90a, so they never rot even on machines without a GPU (CI has nvcc but no GPU)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "musa").glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


def test_device_sources_exist():
    assert SOURCES, "csrc/musa has no kernel sources"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_device_source_compiles_without_torch(source, tmp_path):
    text = source.read_text()
    assert "#include <torch" not in text and "#include <ATen" not in text, "kernel sources must not include torch"
    # torch's own flags for .cu files (no implicit half/bfloat16 conversions)
    cmd = [NVCC, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
           "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
