"""The device kernels of csrc/musa compile with a plain nvcc (no torch headers), for sm_80 and
sm_90a, so they never rot even on machines without a GPU (CI has nvcc but no GPU)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the Hopper kernels (arch/sm90) build on CUTLASS's CuTe headers (nvidia-cutlass, installed by
# scripts/setup_env.sh); their bodies compile for sm_90a only
MUSA = ROOT / "csrc" / "musa"
SOURCES = sorted(MUSA.glob("*.cu")) + sorted((MUSA / "arch" / "sm80").glob("*.cu")) + sorted((MUSA / "arch" / "sm90").glob("*.cu"))


def _cutlass_include():
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return path if (path / "cute").is_dir() else None
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
    if "sm90" in source.parts:
        cutlass = _cutlass_include()
        if cutlass is None:
            pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
        cmd[1:1] = [f"-I{cutlass}", f"-I{ROOT / 'csrc'}", "-DMATE_WITH_SM90=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # ptxas's C7518: it serializes every wgmma of a kernel whose wgmma issues or waits sit in
    # branches it must treat as divergent; the kernel still runs, 10-20 % slower (measured)
    serialized = [line for line in res.stderr.splitlines() if "C7518" in line]
    assert not serialized, "wgmma serialized by ptxas:\n" + "\n".join(serialized[:4])


# The Hopper forward's opt-in build (MATE_OPS_NVCC_FLAGS): the timeline (-DMATE_SM90_TRACE,
# scripts/sm90_trace.py).
OPT_IN_BUILDS = [("-DMATE_SM90_TRACE", "fmha_fwd_sm90_64.cu")]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("flag,source_name", OPT_IN_BUILDS, ids=lambda x: x.lstrip("-D").replace(".cu", ""))
def test_sm90_opt_in_build_compiles_unserialized(tmp_path, flag, source_name):
    """An opt-in build keeps compiling, and does not make ptxas serialize the wgmmas (a timeline
    or a timing of a serialized kernel would measure a different kernel)."""
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
    source = MUSA / "arch" / "sm90" / source_name
    cmd = [NVCC, f"-I{cutlass}", f"-I{ROOT / 'csrc'}", "-DMATE_WITH_SM90=1", flag, "-std=c++17", "-O1",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-gencode=arch=compute_90a,code=sm_90a", "-c", str(source), "-o", str(tmp_path / "opt_in.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    serialized = [line for line in res.stderr.splitlines() if "C751" in line or "C752" in line]
    assert not serialized, f"wgmma serialized by ptxas in the {flag} build:\n" + "\n".join(serialized[:4])


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_fp8_pv_key_order_matches_cute_layouts(tmp_path):
    """The Hopper forward's fp8 P V (arch/sm90/fp8_pv_order.h): every byte of P's registers holds
    the score of the row and key that wgmma multiplies it with (CuTe's CLayout_64xN / ALayout_64x32),
    checked on the host; the identity key order must fail the same check."""
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
    exe = tmp_path / "fp8_pv_order_check"
    cmd = [NVCC, "-std=c++17", "-x", "cu", f"-I{cutlass}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "host" / "fp8_pv_order_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout.split()
    counts = dict(zip(out[0::2], map(int, out[1::2])))
    assert counts["order"] == 0 and counts["inverse"] == 0, counts
    assert counts["identity"] > 0, counts


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_sm90_schedule_names_every_tile_once(tmp_path):
    """The Hopper forward's tile schedule (make_schedule, work_at), checked on the host: for
    batches, heads, GQA groups, row counts and every section size from one pair to all of them
    (MATE_OPS_FMHA_SM90_L2_SHARE reaches one), each (sequence, head, 128-row block) is named exactly
    once and a pair's later row blocks come first; the host program counts the violations."""
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
    exe = tmp_path / "sm90_schedule_check"
    cmd = [NVCC, "-std=c++17", "-x", "cu", "-DMATE_WITH_SM90=1", "--expt-relaxed-constexpr", f"-I{cutlass}",
           f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "host" / "sm90_schedule_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout.split()
    counts = dict(zip(out[0::2], map(int, out[1::2])))
    assert counts["bad"] == 0 and counts["checked"] > 100000, counts


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_sm90_page_walk_matches_the_per_box_formula(tmp_path):
    """The Hopper forward's walk over a tile's 16-key boxes for pages that do not hold whole key
    tiles (PageWalk), checked on the host: for page sizes 16 .. 256, key tiles 64 / 80 / 128, table
    widths 1 .. 9 and tile starts up to past the table's last page, every box's (page, row) is the
    per-box formula's (the column clamped to the last one, rows past a page's end for boxes past
    the table), and the walk loads one table entry per page the tile touches."""
    cutlass = _cutlass_include()
    if cutlass is None:
        pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
    exe = tmp_path / "sm90_page_walk_check"
    cmd = [NVCC, "-std=c++17", "-x", "cu", "-DMATE_WITH_SM90=1", "--expt-relaxed-constexpr", f"-I{cutlass}",
           f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "host" / "sm90_page_walk_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120).stdout.split()
    counts = dict(zip(out[0::2], map(int, out[1::2])))
    assert counts["bad"] == 0 and counts["checked"] > 20000, counts


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_sm90_forward_consumers_do_not_spill(tmp_path):
    """The Hopper forward's consumer warpgroups (the code after their setmaxnreg raise: softmax,
    GEMM issue, epilogue) keep every value in registers at width 128, plain and ScoreMod scores,
    the steady-state step loop (the smallest loop holding the wgmmas) above all: a spill there is
    a local-memory round trip on every key tile. Read from the SASS of the extension's own nvcc
    flags (scripts/sass_roles.py; the producer warpgroup, at 24 registers, may spill)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import sass_roles

    if _cutlass_include() is None:
        pytest.skip("the nvidia-cutlass headers are not installed (scripts/setup_env.sh installs them)")
    cuobjdump = sass_roles.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump is not installed (scripts/setup_env.sh installs nvidia-cuda-cuobjdump)")
    cubin = sass_roles.compile_cubin(str(MUSA / "arch" / "sm90" / "fmha_fwd_sm90_128.cu"), str(tmp_path), NVCC)
    kernels = sass_roles.kernel_roles(cubin, cuobjdump)
    assert len(kernels) == 4, [name for name, *_ in kernels]  # bf16 / fp16 x plain / ScoreMod
    for name, _, roles, _, step in kernels:
        consumers = [r for r in roles if r[0] == "consumers"]
        assert len(consumers) == 1, (name, roles)
        _, count, stl, ldl = consumers[0]
        assert count > 1000 and stl == 0 and ldl == 0, f"{name}: consumers spill ({stl} STL, {ldl} LDL)"
        assert step is not None and step[2] == 0 and step[3] == 0, f"{name}: the step loop spills {step}"