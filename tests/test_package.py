"""Package structure: ``import mate_ops`` stays free of test code, ``mate_ops.testing`` keeps its names.

- ``import mate_ops`` (and using the production APIs, FP8 cache helpers included) never loads
  ``mate_ops.testing``: the oracle and test helpers are imported only on request.
- ``mate_ops.testing`` still exports every public name it had as a single module, and the FP8
  MLA cache helpers it re-exports are the production ones of ``mate_ops.mla_fp8``.
"""
import os
import subprocess
import sys
import textwrap

import torch

import mate_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every public name of mate_ops.testing when it was one module (tests and users import these)
TESTING_NAMES = [
    "fmha_ref", "combine_ref", "rotary_ref", "kvcache_append_ref", "assert_close_fa3", "DEFAULT_ATOL",
    "poison_", "random_seqlens", "random_cu_seqlens", "make_paged_kv", "quantize_mla_v32",
    "dequantize_mla_v32", "quantize_mla_model1", "dequantize_mla_model1", "mla_model1_block_stride",
    "mla_decode_ref", "mla_sparse_prefill_ref", "mla_paged_ref",
]
FP8_NAMES = ["quantize_mla_v32", "dequantize_mla_v32", "quantize_mla_model1", "dequantize_mla_model1",
             "mla_model1_block_stride"]


def _python(code):
    """Run ``code`` in a fresh interpreter that imports this checkout's mate_ops."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_import_mate_ops_does_not_load_testing():
    p = _python("import mate_ops, sys; assert 'mate_ops.testing' not in sys.modules")
    assert p.returncode == 0, p.stderr


def test_production_apis_do_not_load_testing():
    p = _python("""
        import os, sys
        import torch
        import mate_ops
        from mate_ops import flash_attn_interface, flash_mla, flashinfer, flashmla, metal_flash_sdpa, mha_interface
        root = os.path.dirname(os.path.dirname(os.path.abspath(mate_ops.__file__)))
        assert root == os.getcwd(), (root, os.getcwd())  # this checkout's package
        kv = torch.randn(2, 4, 1, 576, dtype=torch.bfloat16)
        back = flashmla.dequantize_k_cache(flashmla.quantize_k_cache(kv, "v32"))
        assert back.shape == (2, 4, 1, 576)
        kv1 = torch.randn(2, 4, 1, 512, dtype=torch.bfloat16)
        assert flashmla.dequantize_k_cache(flashmla.quantize_k_cache(kv1, "model1")).shape == (2, 4, 1, 512)
        loaded = sorted(m for m in sys.modules if m == "mate_ops.testing" or m.startswith("mate_ops.testing."))
        assert not loaded, loaded
    """)
    assert p.returncode == 0, p.stderr


def test_testing_exports_every_public_name():
    import mate_ops.testing as T
    from mate_ops import mla_fp8

    missing = [n for n in TESTING_NAMES if not hasattr(T, n)]
    assert not missing, missing
    assert set(TESTING_NAMES) <= set(T.__all__)
    for n in FP8_NAMES:  # re-exported from the production module, not copies
        assert getattr(T, n) is getattr(mla_fp8, n), n
    # the attribute spelling works too once imported
    assert mate_ops.testing.fmha_ref is T.fmha_ref
    ns = {}
    exec("from mate_ops.testing import *", ns)
    assert set(TESTING_NAMES) <= set(ns)


def test_testing_submodules():
    from mate_ops.testing import data, oracle, tolerance

    assert oracle.fmha_ref.__module__ == "mate_ops.testing.oracle"
    assert data.poison_.__module__ == "mate_ops.testing.data"
    assert tolerance.assert_close_fa3.__module__ == "mate_ops.testing.tolerance"
    assert mate_ops.mla_fp8.quantize_mla_v32.__module__ == "mate_ops.mla_fp8"


def test_flashmla_cache_helpers_match_mla_fp8():
    from mate_ops import flashmla, mla_fp8

    kv = torch.randn(3, 5, 1, 576, dtype=torch.bfloat16)
    cache = flashmla.quantize_k_cache(kv)
    assert torch.equal(cache, mla_fp8.quantize_mla_v32(kv))
    assert torch.equal(flashmla.dequantize_k_cache(cache), mla_fp8.dequantize_mla_v32(cache))
    kv1 = torch.randn(3, 5, 1, 512, dtype=torch.bfloat16)
    c1 = flashmla.quantize_k_cache(kv1, "model1")
    assert c1.stride(0) == mla_fp8.mla_model1_block_stride(5)
    assert torch.equal(flashmla.dequantize_k_cache(c1), mla_fp8.dequantize_mla_model1(c1))
