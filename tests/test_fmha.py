"""FMHA forward (torch.ops.mate.fmha_fwd / fmha_fwd_out through mate_ops.mha_interface)
against the pure-PyTorch oracle, on random inputs with poisoned outputs.

Every case runs twice: the functional op, and the out= op writing into a NaN-poisoned
buffer (so a row the kernel forgets to write fails the test).
"""
import math
import subprocess
import sys

import pytest
import torch

from mate_ops import mha_interface as mi
from mate_ops import testing as T

FP8 = torch.float8_e4m3fn


def _lowp_dtype(dtype):
    return dtype  # oracle in the input precision (FA3's reference with upcast=False)


def check_fmha(q, k, v, *, device, num_splits=1, **kw):
    """Run the op (functional and out=) and compare out and lse against the oracle."""
    ref_kw = {key: kw[key] for key in kw if key not in ("max_seqlen_q", "max_seqlen_k", "scheduler_metadata", "pack_gqa")}
    window = ref_kw.pop("window_size", (-1, -1))
    out_ref, lse_ref = T.fmha_ref(q, k, v, window_size=window, **ref_kw)
    out_lowp, _ = T.fmha_ref(q, k, v, window_size=window, compute_dtype=_lowp_dtype(q.dtype), **ref_kw)

    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = {key: dev(val) for key, val in kw.items()}
    qd, kd, vd = dev(q), dev(k), dev(v)
    if "cache_batch_idx" in kw or "cache_leftpad" in kw:
        # kv-cache options: not part of MATE's varlen signature, call the op directly
        left, right = args.pop("window_size", (-1, -1))
        op_args = dict(args, window_size_left=left, window_size_right=right, num_splits=num_splits)
        results = [torch.ops.mate.fmha_fwd(qd, kd, vd, **op_args)]
        out_buf = T.poison_(torch.empty(out_ref.shape, dtype=out_ref.dtype, device=device))
        lse_buf = T.poison_(torch.empty(lse_ref.shape, dtype=torch.float32, device=device))
        torch.ops.mate.fmha_fwd_out(qd, kd, vd, out_buf, lse_buf, **op_args)
        results.append((out_buf, lse_buf))
    else:
        results = [mi.flash_attn_varlen_func(qd, kd, vd, num_splits=num_splits, return_softmax_lse=True, **args)]
        out_buf = T.poison_(torch.empty(out_ref.shape, dtype=out_ref.dtype, device=device))
        out2, lse2 = mi.flash_attn_varlen_func(qd, kd, vd, num_splits=num_splits, return_softmax_lse=True,
                                               out=out_buf, **args)
        assert out2.data_ptr() == out_buf.data_ptr()
        results.append((out2, lse2))
    for out, lse in results:
        assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
        T.assert_close_fa3(out, out_ref, out_lowp, input_dtype=q.dtype)
        T.assert_lse_close(lse, lse_ref, input_dtype=q.dtype)
    return results[0]


def rand(*shape, dtype=torch.bfloat16):
    if dtype == FP8:
        return (torch.randn(*shape) * 2).to(FP8)
    return torch.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------- dense --------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 37), (64, 64), (113, 203), (300, 150)])
def test_dense(device, dtype, causal, sq, sk):
    q, k, v = rand(2, sq, 4, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype)
    check_fmha(q, k, v, device=device, causal=causal)


@pytest.mark.parametrize("d,dv", [(32, 32), (72, 72), (80, 80), (96, 96), (128, 128), (192, 128),
                                  (192, 192), (256, 256), (320, 320), (512, 512), (64, 512), (40, 24)])
def test_head_dims(device, d, dv):
    q, k, v = rand(1, 33, 2, d), rand(1, 77, 1, d), rand(1, 77, 1, dv)
    check_fmha(q, k, v, device=device, causal=True)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pack_gqa", [False, True])
def test_tensor_core_tiles(device, d, dtype, causal, pack_gqa):
    """The head dims of the device's tensor-core path, over several row blocks and key tiles
    with ragged edges (lengths not multiples of any tile), GQA packed or not."""
    q, k, v = rand(2, 201, 8, d, dtype=dtype), rand(2, 333, 2, d, dtype=dtype), rand(2, 333, 2, d, dtype=dtype)
    check_fmha(q, k, v, device=device, causal=causal, pack_gqa=pack_gqa)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sq,h", [(1, 8), (2, 8), (1, 32), (3, 16)])
@pytest.mark.parametrize("num_splits", [1, 0, 5])
def test_decode_shapes(device, d, sq, h, num_splits):
    """Few query rows (the decode tile: up to 16 packed rows per kv head, else the prefill
    tile) with and without key splits."""
    q, k, v = rand(3, sq, h, d), rand(3, 700, 2, d), rand(3, 700, 2, d)
    check_fmha(q, k, v, device=device, causal=True, num_splits=num_splits)


@pytest.mark.parametrize("d,dv", [(80, 80), (96, 96), (192, 128), (72, 72), (64, 128), (128, 64), (160, 160),
                                  (256, 128), (40, 24)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_padded_dims(device, d, dv, dtype, causal):
    """Head dims that the device's tensor-core path pads inside the kernel (to the 64, 128,
    192 x 128 or 256 tile widths; zero channels, never stored): several row blocks and key
    tiles with ragged edges, GQA packed."""
    q, k, v = rand(2, 201, 8, d, dtype=dtype), rand(2, 333, 2, d, dtype=dtype), rand(2, 333, 2, dv, dtype=dtype)
    check_fmha(q, k, v, device=device, causal=causal, pack_gqa=True)


@pytest.mark.parametrize("d,dv", [(96, 96), (192, 128), (80, 80)])
@pytest.mark.parametrize("sq,h", [(1, 8), (3, 16)])
@pytest.mark.parametrize("num_splits", [1, 0, 5])
def test_tensor_core_padded_decode(device, d, dv, sq, h, num_splits):
    """The same padded widths on the decode tile, with and without key splits (the fp32
    partials are Dv wide, not the padded width)."""
    q, k, v = rand(3, sq, h, d), rand(3, 700, 2, d), rand(3, 700, 2, dv)
    check_fmha(q, k, v, device=device, causal=True, num_splits=num_splits)


@pytest.mark.parametrize("h,hk", [(8, 8), (8, 2), (8, 1), (12, 3)])
def test_gqa_mqa(device, h, hk):
    q, k, v = rand(2, 40, h, 64), rand(2, 90, hk, 64), rand(2, 90, hk, 64)
    check_fmha(q, k, v, device=device, causal=False)


@pytest.mark.parametrize("window,chunk,causal", [
    ((16, 0), 0, False), ((-1, 8), 0, False), ((5, 7), 0, False), ((32, -1), 0, True),
    ((-1, -1), 48, False), ((-1, -1), 32, True), ((20, 20), 64, False), ((0, 0), 0, False),
])
def test_local_and_chunk(device, window, chunk, causal):
    q, k, v = rand(2, 100, 4, 64), rand(2, 170, 2, 64), rand(2, 170, 2, 64)
    check_fmha(q, k, v, device=device, window_size=window, attention_chunk=chunk, causal=causal)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap(device, softcap):
    q, k, v = rand(2, 50, 4, 64) * 4, rand(2, 80, 4, 64), rand(2, 80, 4, 64)
    check_fmha(q, k, v, device=device, softcap=softcap, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_learnable_sink(device, causal):
    q, k, v = rand(2, 70, 4, 64), rand(2, 50, 2, 64), rand(2, 50, 2, 64)
    sink = torch.randn(4, dtype=torch.float32) * 2
    out, lse = check_fmha(q, k, v, device=device, learnable_sink=sink, causal=causal)
    if causal:  # rows 0..19 see no key: out 0, lse = sink
        assert torch.equal(out[:, :20].float().cpu(), torch.zeros_like(out[:, :20].float().cpu()))
        torch.testing.assert_close(lse[:, :, :20].cpu(), sink.view(1, 4, 1).expand(2, 4, 20))


def test_softmax_scale_and_qv(device):
    q, k, v = rand(2, 30, 4, 64), rand(2, 60, 2, 64), rand(2, 60, 2, 128)
    qv = rand(2, 30, 4, 128)
    check_fmha(q, k, v, device=device, qv=qv, causal=True)  # default scale 1/sqrt(D + Dv)
    check_fmha(q, k, v, device=device, softmax_scale=0.3)


# ---------------------------------------------------------------- qv on tensor cores ------
# bf16 / fp16 qv calls with D <= 64 and Dv <= 512 take the mma.sync qv kernel
# (arch/sm80/fmha_qv_mma.cu: 512 channels split over four column warps whose partial scores
# meet in shared memory); on CUDA the profiler must show it ran. Tile edges: 32 rows, 32 keys.

def check_qv(q, k, v, qv, *, device, num_splits=1, **kw):
    """check_fmha with qv, and on CUDA the assertion that the qv tensor-core kernel ran."""
    out = check_fmha(q, k, v, device=device, qv=qv, num_splits=num_splits, **kw)
    if device == "cuda":
        import sm90_child  # the profiler helper (a sibling module)
        dev = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
        args = {key: dev(val) for key, val in kw.items()}
        left, right = args.pop("window_size", (-1, -1))
        names = sm90_child.kernels_run(lambda: torch.ops.mate.fmha_fwd(
            q.cuda(), k.cuda(), v.cuda(), qv=qv.cuda(), num_splits=num_splits, window_size_left=left,
            window_size_right=right, **args), device)
        assert names is not None and any("fmha_qv_mma_kernel" in n for n in names), names
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 77), (45, 45), (100, 161), (200, 70)])
def test_qv_tensor_cores(device, dtype, causal, sq, sk):
    q, k = rand(2, sq, 4, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype)
    v, qv = rand(2, sk, 2, 512, dtype=dtype), rand(2, sq, 4, 512, dtype=dtype)
    check_qv(q, k, v, qv, device=device, causal=causal)


@pytest.mark.parametrize("d,dv", [(64, 256), (32, 512), (16, 136), (64, 64), (48, 504)])
def test_qv_tensor_core_padded_dims(device, d, dv):
    q, k, v = rand(1, 70, 4, d), rand(1, 90, 4, d), rand(1, 90, 4, dv)
    check_qv(q, k, v, rand(1, 70, 4, dv), device=device, causal=True)


@pytest.mark.parametrize("pack_gqa", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_qv_gqa_splits(device, pack_gqa, num_splits):
    q, k, v = rand(2, 3, 8, 64), rand(2, 300, 2, 64), rand(2, 300, 2, 512)
    check_qv(q, k, v, rand(2, 3, 8, 512), device=device, pack_gqa=pack_gqa, num_splits=num_splits)


@pytest.mark.parametrize("opts", [dict(window_size=(40, 5)), dict(softcap=10.0), dict(softmax_scale=-0.05),
                                  dict(learnable_sink=True)],
                         ids=["window", "softcap", "negative-scale", "sink"])
def test_qv_masks_and_score_mods(device, opts):
    opts = dict(opts)
    if opts.pop("learnable_sink", False):
        opts["learnable_sink"] = torch.randn(4, dtype=torch.float32) * 2
    q, k, v = rand(2, 96, 4, 64), rand(2, 130, 2, 64), rand(2, 130, 2, 512)
    check_qv(q, k, v, rand(2, 96, 4, 512), device=device, **opts)


@pytest.mark.parametrize("causal", [False, True])
def test_qv_alibi(device, causal):
    q, k, v, qv = rand(2, 40, 4, 64), rand(2, 70, 2, 64), rand(2, 70, 2, 512), rand(2, 40, 4, 512)
    slopes = torch.rand(4) * 0.3
    ref_out, ref_lse = T.fmha_ref(q, k, v, qv=qv, causal=causal, alibi_slopes=slopes)
    low, _ = T.fmha_ref(q, k, v, qv=qv, causal=causal, alibi_slopes=slopes, compute_dtype=q.dtype)
    dev = [t.to(device) for t in (q, k, v, qv, slopes)]
    for splits in (1, 3):
        run = lambda: torch.ops.mate.fmha_fwd(*dev[:3], qv=dev[3], causal=causal, num_splits=splits,  # noqa: E731
                                              alibi_slopes=dev[4])
        out, lse = run()
        T.assert_close_fa3(out, ref_out, low)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-3, rtol=1e-4)
        if device == "cuda":
            import sm90_child
            names = sm90_child.kernels_run(run, device)
            assert names is not None and any("fmha_qv_mma_kernel" in n for n in names), names


def test_qv_varlen_and_seqused(device):
    lq, lk = [5, 0, 70, 33], [17, 9, 100, 300]
    q, k, v = rand(sum(lq), 4, 64), rand(sum(lk), 2, 64), rand(sum(lk), 2, 512)
    check_qv(q, k, v, rand(sum(lq), 4, 512), device=device, cu_seqlens_q=T.random_cu_seqlens(lq),
             cu_seqlens_k=T.random_cu_seqlens(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk), causal=True)
    q, k, v = rand(3, 40, 4, 64), rand(3, 70, 2, 64), rand(3, 70, 2, 512)
    check_qv(q, k, v, rand(3, 40, 4, 512), device=device, seqused_q=torch.tensor([40, 7, 0], dtype=torch.int32),
             seqused_k=torch.tensor([70, 33, 12], dtype=torch.int32), causal=True)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_qv_paged(device, page_size):
    seqlens = [100, 1, 130]
    kd, vd = rand(3, 140, 2, 64), rand(3, 140, 2, 512)
    kp, vp, pt = T.make_paged_kv(kd, vd, seqlens, page_size)
    check_qv(rand(3, 5, 4, 64), kp, vp, rand(3, 5, 4, 512), device=device, page_table=pt,
             seqused_k=torch.tensor(seqlens, dtype=torch.int32), causal=True)


def test_empty_keys_and_masked_rows(device):
    # Sq > Sk under causal: the first rows see nothing -> out 0, lse -inf (never NaN)
    q, k, v = rand(1, 40, 2, 64), rand(1, 10, 2, 64), rand(1, 10, 2, 64)
    out, lse = check_fmha(q, k, v, device=device, causal=True)
    assert torch.isneginf(lse[0, :, :30].cpu()).all()
    # no keys at all
    out, lse = check_fmha(q, k[:, :0], v[:, :0], device=device)
    assert (out.float() == 0).all() and torch.isneginf(lse).all()


# ---------------------------------------------------------------- ragged / padded ---------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(device, dtype, causal):
    lq, lk = [5, 0, 130, 64, 1], [17, 9, 130, 1, 300]
    cu_q, cu_k = T.random_cu_seqlens(lq), T.random_cu_seqlens(lk)
    q, k, v = rand(sum(lq), 6, 64, dtype=dtype), rand(sum(lk), 3, 64, dtype=dtype), rand(sum(lk), 3, 64, dtype=dtype)
    check_fmha(q, k, v, device=device, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq),
               max_seqlen_k=max(lk), causal=causal)


def test_varlen_rows_outside_sequences_zeroed(device):
    lq = [3, 4]
    cu_q = T.random_cu_seqlens(lq)
    q = rand(10, 2, 64)  # rows 7..9 belong to no sequence
    k, v = rand(2, 20, 2, 64), rand(2, 20, 2, 64)
    out, lse = check_fmha(q, k, v, device=device, cu_seqlens_q=cu_q, max_seqlen_q=4)
    assert (out[7:].float() == 0).all() and torch.isneginf(lse[:, 7:]).all()


def test_padded_seqused(device):
    q, k, v = rand(3, 40, 4, 64), rand(3, 70, 2, 64), rand(3, 70, 2, 64)
    seqused_q = torch.tensor([40, 7, 0], dtype=torch.int32)
    seqused_k = torch.tensor([70, 33, 12], dtype=torch.int32)
    check_fmha(q, k, v, device=device, seqused_q=seqused_q, seqused_k=seqused_k, causal=True)


def test_varlen_seqused_k_past_own_segment(device):
    """FA3: sequence b reads seqused_k[b] keys from cu_seqlens_k[b], even past cu_seqlens_k[b+1]."""
    lq, lk = [3, 4], [5, 6]
    q, k, v = rand(7, 2, 64), rand(11, 2, 64), rand(11, 2, 64)
    check_fmha(q, k, v, device=device, cu_seqlens_q=T.random_cu_seqlens(lq), cu_seqlens_k=T.random_cu_seqlens(lk),
               max_seqlen_q=4, max_seqlen_k=8, seqused_k=torch.tensor([8, 2], dtype=torch.int32))


def test_varlen_q_dense_k_with_seqused(device):
    lq = [4, 9, 1]
    q = rand(sum(lq), 4, 64)
    k, v = rand(3, 50, 4, 64), rand(3, 50, 4, 64)
    check_fmha(q, k, v, device=device, cu_seqlens_q=T.random_cu_seqlens(lq), max_seqlen_q=9,
               seqused_k=torch.tensor([50, 20, 3], dtype=torch.int32), causal=True)


# ---------------------------------------------------------------- paged / cache -----------

@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 256])
def test_paged(device, page_size):
    seqlens = [100, 1, 257, 64]
    kd, vd = rand(4, 260, 2, 64), rand(4, 260, 2, 64)
    kp, vp, pt = T.make_paged_kv(kd, vd, seqlens, page_size)
    q = rand(4, 5, 4, 64)
    check_fmha(q, kp, vp, device=device, page_table=pt, seqused_k=torch.tensor(seqlens, dtype=torch.int32),
               causal=True)


def test_paged_batch_idx_and_leftpad(device):
    seqlens = [90, 50, 130]
    kd, vd = rand(3, 140, 2, 64), rand(3, 140, 2, 64)
    kp, vp, pt = T.make_paged_kv(kd, vd, seqlens, 16)
    # a larger page table whose rows are picked by cache_batch_idx
    big = torch.cat([pt, pt.flip(0), pt])
    idx = torch.tensor([3, 4, 0], dtype=torch.int32)  # rows 3 -> seq 2, 4 -> seq 1, 0 -> seq 0
    seqused = torch.tensor([seqlens[2], seqlens[1], seqlens[0]], dtype=torch.int32)
    leftpad = torch.tensor([3, 0, 17], dtype=torch.int32)
    q = rand(3, 4, 4, 64)
    check_fmha(q, kp, vp, device=device, page_table=big, cache_batch_idx=idx, seqused_k=seqused,
               cache_leftpad=leftpad, causal=True)


def test_dense_cache_batch_idx_and_leftpad(device):
    kc, vc = rand(5, 80, 2, 64), rand(5, 80, 2, 64)
    q = rand(3, 6, 4, 64)
    check_fmha(q, kc, vc, device=device, cache_batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32),
               seqused_k=torch.tensor([80, 10, 45], dtype=torch.int32),
               cache_leftpad=torch.tensor([5, 10, 0], dtype=torch.int32), window_size=(20, 0))


# ---------------------------------------------------------------- fp8 ----------------------

@pytest.mark.parametrize("with_descale", [False, True])
def test_fp8(device, with_descale):
    q, k, v = rand(2, 40, 4, 64, dtype=FP8), rand(2, 90, 2, 64, dtype=FP8), rand(2, 90, 2, 64, dtype=FP8)
    kw = {}
    if with_descale:
        kw = dict(q_descale=torch.rand(2, 2) + 0.5, k_descale=torch.rand(2, 2) + 0.5, v_descale=torch.rand(2, 2) + 0.5)
    out, _ = check_fmha(q, k, v, device=device, causal=True, **kw)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("d,dv", [(128, 128), (256, 256), (192, 128), (96, 96), (48, 48)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_tensor_core_widths(device, d, dv, causal, num_splits):
    """FP8 e4m3 prefill at the widths the device's tensor-core path serves (inputs converted
    to bf16 inside the kernel): several row blocks and key tiles with ragged edges, GQA,
    descales per (batch, kv head), with and without key splits."""
    q, k, v = rand(2, 150, 8, d, dtype=FP8), rand(2, 211, 2, d, dtype=FP8), rand(2, 211, 2, dv, dtype=FP8)
    kw = dict(q_descale=torch.rand(2, 2) + 0.5, k_descale=torch.rand(2, 2) + 0.5, v_descale=torch.rand(2, 2) + 0.5)
    out, _ = check_fmha(q, k, v, device=device, causal=causal, num_splits=num_splits, **kw)
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------- splits / metadata -------

@pytest.mark.parametrize("num_splits", [0, 2, 3, 7, 256])
def test_num_splits(device, num_splits):
    q, k, v = rand(2, 3, 8, 64), rand(2, 1000, 2, 64), rand(2, 1000, 2, 64)
    sink = torch.randn(8)
    check_fmha(q, k, v, device=device, num_splits=num_splits, causal=True, learnable_sink=sink)


def test_splits_equal_combining_manual_splits(device):
    """num_splits=n equals attention over n key chunks merged with flash_attn_combine."""
    q, k, v = rand(2, 4, 4, 64, dtype=torch.float32), rand(2, 512, 4, 64, dtype=torch.float32), rand(2, 512, 4, 64, dtype=torch.float32)
    q, k, v = q.to(device), k.to(device), v.to(device)
    out_split, lse_split = mi.flash_attn_varlen_func(q, k, v, num_splits=4, return_softmax_lse=True)
    parts = [mi.flash_attn_varlen_func(q, k[:, i:i + 128], v[:, i:i + 128], num_splits=1, return_softmax_lse=True)
             for i in range(0, 512, 128)]
    out_partial = torch.stack([o for o, _ in parts])                   # (S, B, Sq, H, D)
    lse_partial = torch.stack([l.transpose(1, 2) for _, l in parts])   # (S, B, Sq, H)
    out_c, lse_c = mi.flash_attn_combine(out_partial, lse_partial)
    torch.testing.assert_close(out_split, out_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_split, lse_c.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_scheduler_metadata_same_result(device):
    B, H, Hk, D = 3, 8, 2, 64
    k, v = rand(B, 700, Hk, D).to(device), rand(B, 700, Hk, D).to(device)
    q = rand(B, 1, H, D).to(device)
    seqused_k = torch.tensor([700, 5, 333], dtype=torch.int32, device=device)
    meta = mi.get_scheduler_metadata(B, 1, 700, H, Hk, D, seqused_k=seqused_k, causal=True, num_splits=0)
    assert meta.shape == (B + 1,) and meta.dtype == torch.int32
    plain = mi.flash_attn_varlen_func(q, k, v, seqused_k=seqused_k, causal=True, num_splits=0)
    for _ in range(2):  # reusable across calls
        with_meta = mi.flash_attn_varlen_func(q, k, v, seqused_k=seqused_k, causal=True, num_splits=0,
                                              scheduler_metadata=meta)
        torch.testing.assert_close(plain, with_meta, atol=2e-3, rtol=0)
    forced = mi.get_scheduler_metadata(B, 1, 700, H, Hk, D, seqused_k=seqused_k, num_splits=5)
    assert int(forced[0]) == 5
    check_fmha(q.cpu(), k.cpu(), v.cpu(), device=device, seqused_k=seqused_k.cpu(), causal=True,
               scheduler_metadata=forced.cpu() if device == "cpu" else forced, num_splits=0)


# ---------------------------------------------------------------- context parallel --------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_context_parallel_combines_to_full(device, world, causal):
    B, Sq, Sk, H = 2, 20, 90, 4
    q, k, v = rand(B, Sq, H, 64, dtype=torch.float32), rand(B, Sk, H, 64, dtype=torch.float32), rand(B, Sk, H, 64, dtype=torch.float32)
    tot = torch.full((B,), Sk, dtype=torch.int32)
    full, full_lse = T.fmha_ref(q, k, v, causal=causal)
    outs, lses = [], []
    for r in range(world):
        kr, vr = k[:, r::world].contiguous(), v[:, r::world].contiguous()
        out, lse = check_fmha(q, kr, vr, device=device, causal=causal, cp_world_size=world, cp_rank=r,
                              cp_tot_seqused_k=tot)
        outs.append(out.float())
        lses.append(lse.transpose(1, 2))
    out_c, lse_c = mi.flash_attn_combine(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out_c.cpu(), full.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c.transpose(1, 2).cpu(), full_lse, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- combine ------------------

@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
def test_combine(device, out_dtype):
    S, B, Sq, H, Dv = 5, 2, 3, 4, 96
    op = torch.randn(S, B, Sq, H, Dv)
    lp = torch.randn(S, B, Sq, H) * 3
    lp[1, 0] = -math.inf                      # an empty split
    lp[:, 1, 2, 3] = -math.inf                # a row where every split is empty
    op[1, 0] = float("nan")                   # its garbage must not leak
    out, lse = mi.flash_attn_combine(op.to(device), lp.to(device), out_dtype=out_dtype)
    ref_out, ref_lse = T.combine_ref(op, lp, out_dtype=out_dtype)
    assert out.dtype == (out_dtype or torch.float32)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-3 if out_dtype else 1e-5, rtol=1e-3 if out_dtype else 1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)
    assert (out[1, 2, 3] == 0).all() and torch.isneginf(lse[1, 2, 3])
    # out= variant into a poisoned buffer, and the varlen (S, Tq, H, Dv) layout
    buf = T.poison_(torch.empty(B, Sq, H, Dv, device=device))
    out2, lse2 = mi.flash_attn_combine(op.to(device), lp.to(device), out=buf)
    assert out2.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out2.cpu(), T.combine_ref(op, lp)[0], atol=1e-5, rtol=1e-5)
    out3, lse3 = mi.flash_attn_combine(op.flatten(1, 2).to(device), lp.flatten(1, 2).to(device))
    torch.testing.assert_close(out3.cpu(), ref_out.float().flatten(0, 1) if out_dtype is None else out3.cpu())


# ---------------------------------------------------------------- memory -------------------

def test_long_causal_sequence_bounded_memory():
    """A 32k-token causal sequence runs without an Sq x Sk buffer (peak RSS growth < 512 MiB;
    a materialized fp32 score matrix would need 4 GiB)."""
    code = r"""
import torch, mate_ops, resource
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
S = 32768
q = torch.randn(1, S, 1, 64, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
torch.ops.mate.fmha_fwd(q[:, :256], k[:, :256], v[:, :256], causal=True)  # warm-up allocations
base = hwm()
out, lse = torch.ops.mate.fmha_fwd(q, k, v, causal=True, window_size_left=-1)
assert torch.isfinite(out.float()).all()
print(hwm() - base)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    growth_mib = float(res.stdout.strip().splitlines()[-1])
    assert growth_mib < 512, f"peak memory grew by {growth_mib:.0f} MiB"


# ---------------------------------------------------------------- ALiBi --------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(device, causal, per_batch):
    """FA2's ALiBi: -slope * |i + Sk - Sq - j| added to the scaled score (fmha_fwd's alibi_slopes)."""
    q, k, v = rand(2, 40, 4, 64), rand(2, 70, 2, 64), rand(2, 70, 2, 64)
    slopes = torch.rand(2, 4) if per_batch else torch.rand(4)
    ref_out, ref_lse = T.fmha_ref(q, k, v, causal=causal, alibi_slopes=slopes)
    low, _ = T.fmha_ref(q, k, v, causal=causal, alibi_slopes=slopes, compute_dtype=q.dtype)
    for splits in (1, 3):
        out, lse = torch.ops.mate.fmha_fwd(q.to(device), k.to(device), v.to(device), causal=causal,
                                           num_splits=splits, alibi_slopes=slopes.to(device))
        T.assert_close_fa3(out, ref_out, low)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-3, rtol=1e-4)


def test_alibi_varlen_paged_leftpad(device):
    seqlens = [60, 33]
    kd, vd = rand(2, 64, 2, 64), rand(2, 64, 2, 64)
    kp, vp, pt = T.make_paged_kv(kd, vd, seqlens, 16)
    q = rand(2, 5, 4, 64)
    kw = dict(page_table=pt, seqused_k=torch.tensor(seqlens, dtype=torch.int32),
              cache_leftpad=torch.tensor([4, 0], dtype=torch.int32), causal=True, alibi_slopes=torch.rand(4))
    ref_out, _ = T.fmha_ref(q, kp, vp, **kw)
    low, _ = T.fmha_ref(q, kp, vp, compute_dtype=q.dtype, **kw)
    out, _ = torch.ops.mate.fmha_fwd(q.to(device), kp.to(device), vp.to(device),
                                     **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    T.assert_close_fa3(out, ref_out, low)


def test_broadcast_kv_rows(device):
    """k/v whose rows overlap (an expanded view, row stride 0) give the same result as the
    materialized tensors: the kernels must not hand such strides to a BLAS."""
    q = rand(1, 40, 4, 64, dtype=torch.float32)
    k1, v1 = rand(1, 1, 2, 64, dtype=torch.float32), rand(1, 1, 2, 64, dtype=torch.float32)
    k, v = k1.expand(1, 300, 2, 64), v1.expand(1, 300, 2, 64)
    out = mi.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), causal=True)
    ref = mi.flash_attn_varlen_func(q.to(device), k.contiguous().to(device), v.contiguous().to(device), causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
