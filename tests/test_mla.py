"""MLA (mla_decode, mla_sparse_prefill, get_mla_metadata, FlashInfer wrapper) against the
pure-PyTorch oracle. Unused cache slots are NaN (or garbage FP8 bytes) and must never leak."""
import math

import pytest
import torch

from mate_ops import flashmla as fm
from mate_ops import testing as T
from mate_ops.flashinfer import BatchMLAPagedAttentionWrapper


DEVICE_OPS = ("mate::mla_decode", "mate::mla_sparse_prefill", "mate::get_mla_metadata")

BF16 = torch.bfloat16


def paged_cache(lens, P, Hkv, D, dtype=BF16, gen=None):
    """A shuffled page pool holding `lens` tokens per sequence; every other slot is NaN."""
    B = len(lens)
    dense = torch.randn(B, max(lens + [1]), Hkv, D, dtype=dtype)
    kp, _, table = T.make_paged_kv(dense, dense[..., :1], lens, P, generator=gen)
    return kp, table


def check_mla(out, lse, ref_out, ref_lse, low_out, input_dtype=BF16):
    T.assert_close_fa3(out, ref_out, low_out, input_dtype=input_dtype)
    assert out.dtype == ref_out.dtype and lse.shape == ref_lse.shape
    inf = torch.isinf(ref_lse)
    assert torch.equal(lse.cpu()[inf], ref_lse[inf]), "lse infinities differ (a query with no key has lse +inf)"
    torch.testing.assert_close(lse.cpu()[~inf], ref_lse[~inf], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("B,Sq,Hq,Hkv,P,causal", [
    (1, 1, 1, 1, 64, False), (2, 2, 16, 1, 64, True), (3, 4, 128, 1, 64, True), (64, 1, 8, 1, 16, False),
    (4, 3, 16, 2, 5, True), (2, 1, 32, 4, 1, False),
])
@pytest.mark.parametrize("dqk", [576, 512])
def test_dense_decode(device, B, Sq, Hq, Hkv, P, causal, dqk):
    gen = torch.Generator().manual_seed(B * 100 + Hq)
    lens = [int(x) for x in torch.randint(0, 200, (B,), generator=gen)]
    lens[0] = 0 if B > 1 else lens[0]  # a zero-length cache
    kc, table = paged_cache(lens, P, Hkv, dqk, gen=gen)
    q = torch.randn(B, Sq, Hq, dqk, dtype=BF16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    meta = fm.get_mla_metadata(seqlens.to(device), Sq * Hq // Hkv, Hkv)
    out, lse = fm.flash_mla_with_kvcache(q.to(device), kc.to(device), table.to(device), seqlens.to(device), 512,
                                         *meta, causal=causal)
    ref = T.mla_decode_ref(q, kc, table, seqlens, 512, causal=causal)
    low = T.mla_decode_ref(q, kc, table, seqlens, 512, causal=causal, compute_dtype=BF16)
    check_mla(out, lse, *ref, low[0])
    # metadata is only a hint: the result is identical without it
    out2, _ = fm.flash_mla_with_kvcache(q.to(device), kc.to(device), table.to(device), seqlens.to(device), 512,
                                        None, None, causal=causal)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)


@pytest.mark.parametrize("topk", [1, 64, 100, 2048 // 16])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("sink", [None, "finite", "+inf", "-inf"])
def test_sparse_decode(device, topk, with_extra, sink):
    gen = torch.Generator().manual_seed(topk)
    B, Sq, Hq, P, nb = 3, 2, 16, 64, 5
    kc = torch.randn(nb, P, 1, 576, dtype=BF16)
    q = torch.randn(B, Sq, Hq, 576, dtype=BF16)
    idx = torch.randint(-1, nb * P + 20, (B, Sq, topk), dtype=torch.int32, generator=gen)  # some -1 / out of range
    idx[1, 0] = -1                                   # a row with no valid index: out 0, lse +inf
    topk_length = torch.tensor([topk, max(topk // 2, 1), topk], dtype=torch.int32)
    kw = dict(indices=idx, topk_length=topk_length)
    if with_extra:
        ekc = torch.randn(3, 16, 1, 576, dtype=BF16)
        kw.update(extra_k_cache=ekc, extra_indices_in_kvcache=torch.randint(-1, 48, (B, Sq, 7), dtype=torch.int32),
                  extra_topk_length=torch.tensor([7, 0, 3], dtype=torch.int32))
        kw["extra_indices_in_kvcache"][1, 0] = -1
    if sink is not None:
        s = torch.randn(Hq) if sink == "finite" else torch.full((Hq,), math.inf if sink == "+inf" else -math.inf)
        kw["attn_sink"] = s
    dev = {k: v.to(device) for k, v in kw.items()}
    out, lse = fm.flash_mla_with_kvcache(q.to(device), kc.to(device), None, None, 512, None, None, **dev)
    ref = T.mla_decode_ref(q, kc, None, None, 512, **kw)
    low = T.mla_decode_ref(q, kc, None, None, 512, compute_dtype=BF16, **kw)
    check_mla(out, lse, *ref, low[0])
    assert (out[1, 0].float() == 0).all() and torch.isposinf(lse[1, :, 0]).all()
    if sink == "+inf":
        assert (out.float() == 0).all()


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fp8_caches(device, layout, sparse):
    dqk = 576 if layout == "v32" else 512
    B, Sq, Hq, P, nb = 2, 1, 16, 64, 6
    kv = torch.randn(nb, P, 1, dqk, dtype=BF16)
    cache = fm.quantize_k_cache(kv, layout)
    back = fm.dequantize_k_cache(cache)
    assert back.shape == kv.shape
    assert ((back - kv.float()).abs() <= kv.float().abs() * 0.07 + 1e-2).all(), "FP8 round trip too lossy"
    q = torch.randn(B, Sq, Hq, dqk, dtype=BF16)
    if sparse:
        idx = torch.randint(-1, nb * P, (B, Sq, 150), dtype=torch.int32)
        args = (None, None)
        kw = dict(indices=idx)
    else:
        lens = torch.tensor([130, 300], dtype=torch.int32)
        table = torch.tensor([[5, 1, 3, 0, 0], [2, 4, 0, 3, 1]], dtype=torch.int32)
        args = (table, lens)
        kw = dict(causal=False)
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    out, lse = fm.flash_mla_with_kvcache(dev(q), T.to_device_keeping_layout(cache, device), dev(args[0]), dev(args[1]), 512, None, None,
                                         is_fp8_kvcache=True, **{k: dev(v) for k, v in kw.items()})
    ref = T.mla_decode_ref(q, cache, *args, 512, is_fp8_kvcache=True, **kw)
    low = T.mla_decode_ref(q, cache, *args, 512, is_fp8_kvcache=True, compute_dtype=BF16, **kw)
    check_mla(out, lse, *ref, low[0])


@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_prefill(device, with_sink):
    Sq, Hq, Skv, topk = 37, 16, 300, 90
    q = torch.randn(Sq, Hq, 576, dtype=BF16)
    kv = torch.randn(Skv, 1, 576, dtype=BF16)
    idx = torch.randint(-1, Skv + 5, (Sq, 1, topk), dtype=torch.int32)
    idx[3] = -1
    kw = dict(topk_length=torch.randint(0, topk + 1, (Sq,), dtype=torch.int32))
    if with_sink:
        kw["attn_sink"] = torch.randn(Hq)
    scale = 0.05
    out, max_logits, lse = fm.flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), scale, 512,
                                                   **{k: v.to(device) for k, v in kw.items()})
    ref_out, ref_max, ref_lse = T.mla_sparse_prefill_ref(q, kv, idx, scale, 512, **kw)
    low = T.mla_sparse_prefill_ref(q, kv, idx, scale, 512, compute_dtype=BF16, **kw)
    check_mla(out, lse, ref_out, ref_lse, low[0])
    inf = torch.isinf(ref_max)
    assert torch.equal(max_logits.cpu()[inf], ref_max[inf])
    torch.testing.assert_close(max_logits.cpu()[~inf], ref_max[~inf], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("base_e", [False, True])
def test_flashinfer_wrapper(device, causal, base_e):
    P, npages, H = 16, 30, 8
    ckv = torch.randn(npages, P, 512, dtype=BF16)
    kpe = torch.randn(npages, P, 64, dtype=BF16)
    q_lens, kv_lens = [3, 1, 5], [70, 16, 3]
    qo = T.random_cu_seqlens(q_lens)
    pages_per = [(n + P - 1) // P for n in kv_lens]
    kv_indptr = T.random_cu_seqlens(pages_per)
    kv_indices = torch.randperm(npages)[: sum(pages_per)].to(torch.int32)
    kv_len = torch.tensor(kv_lens, dtype=torch.int32)
    q_nope, q_pe = torch.randn(sum(q_lens), H, 512, dtype=BF16), torch.randn(sum(q_lens), H, 64, dtype=BF16)
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8, device=device))
    w.plan(qo.to(device), kv_indptr.to(device), kv_indices.to(device), kv_len.to(device), H, 512, 64, P, causal, 0.07,
           BF16, BF16)
    out, lse = w.run(q_nope.to(device), q_pe.to(device), ckv.to(device), kpe.to(device), return_lse=True,
                     return_lse_base_on_e=base_e)
    ref_out, ref_lse = T.mla_paged_ref(q_nope, q_pe, ckv, kpe, qo, kv_indptr, kv_indices, kv_len, 0.07, causal,
                                       return_lse_base2=not base_e)
    low = T.mla_paged_ref(q_nope, q_pe, ckv, kpe, qo, kv_indptr, kv_indices, kv_len, 0.07, causal,
                          return_lse_base2=not base_e, compute_dtype=BF16)
    check_mla(out, lse, ref_out, ref_lse, low[0])
    # out= and lse= buffers are written in place
    ob = T.poison_(torch.empty_like(out))
    lb = T.poison_(torch.empty_like(lse))
    o2, l2 = w.run(q_nope.to(device), q_pe.to(device), ckv.to(device), kpe.to(device), out=ob, lse=lb,
                   return_lse=True, return_lse_base_on_e=base_e)
    assert o2.data_ptr() == ob.data_ptr() and l2.data_ptr() == lb.data_ptr()
    assert torch.equal(o2, out) and torch.equal(l2, lse)


def test_flashinfer_cuda_graph_buffers(device):
    P, H = 16, 4
    bufs = [torch.zeros(9, dtype=torch.int32, device=device), torch.zeros(9, dtype=torch.int32, device=device),
            torch.zeros(64, dtype=torch.int32, device=device), torch.zeros(8, dtype=torch.int32, device=device)]
    w = BatchMLAPagedAttentionWrapper(torch.empty(8, dtype=torch.uint8, device=device), True, *bufs)
    ckv, kpe = torch.randn(10, P, 512, dtype=BF16).to(device), torch.randn(10, P, 64, dtype=BF16).to(device)
    ptrs = None
    for lens in ([20, 5], [31, 17]):
        qo = T.random_cu_seqlens([1, 1])
        kvp = T.random_cu_seqlens([2, 2])
        w.plan(qo, kvp, torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), H, 512,
               64, P, True, 0.1, BF16, BF16)
        assert bufs[0][:3].tolist() == qo.tolist() and bufs[3][:2].tolist() == lens  # copied into the buffers
        cur = (w._plan["page_table"].data_ptr(), w._plan["seqused_k"].data_ptr())
        assert ptrs is None or ptrs == cur, "run must read fixed addresses under use_cuda_graph"
        ptrs = cur
        qn, qp = torch.randn(2, H, 512, dtype=BF16), torch.randn(2, H, 64, dtype=BF16)
        out = w.run(qn.to(device), qp.to(device), ckv, kpe)
        ref, _ = T.mla_paged_ref(qn, qp, ckv.cpu(), kpe.cpu(), qo, kvp, torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                                 torch.tensor(lens, dtype=torch.int32), 0.1, True)
        torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- the device kernels' paths
# Shapes that take each path of csrc/musa/mla_kernels.cu: the tensor-core kernel's 16-, 32-
# and 64-row blocks, sequences split over several parts (merged by the combine kernel), any
# page size, fp16, and the portable kernel (fp32, unaligned q). On the CPU they are more
# random cases for the reference.
@pytest.mark.parametrize("B,Sq,Hq,P,causal,dtype,max_len", [
    (1, 1, 128, 64, False, BF16, 3000),      # one long sequence: split over many parts
    (8, 2, 64, 33, True, BF16, 700),         # page size 33, 64-row blocks of 2 queries x 64 heads
    (6, 4, 128, 16, True, torch.float16, 300),
    (64, 1, 16, 1, False, BF16, 90),         # page size 1, 16-row blocks
    (5, 3, 32, 64, True, BF16, 400),         # Sq 3: rows of different causal limits in one block
    (3, 1, 16, 64, False, torch.float32, 200),  # fp32: the portable kernel
])
def test_dense_decode_paths(device, B, Sq, Hq, P, causal, dtype, max_len):
    gen = torch.Generator().manual_seed(B * 7 + Hq + Sq)
    lens = [int(x) for x in torch.randint(1, max_len, (B,), generator=gen)]
    lens[0] = max_len
    if B > 2:
        lens[1] = 0  # a zero-length cache among long ones
    kc, table = paged_cache(lens, P, 1, 576, dtype=dtype, gen=gen)
    q = torch.randn(B, Sq, Hq, 576, dtype=dtype, generator=gen)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = fm.flash_mla_with_kvcache(q.to(device), kc.to(device), table.to(device), seqlens.to(device), 512,
                                         None, None, causal=causal)
    ref = T.mla_decode_ref(q, kc, table, seqlens, 512, causal=causal)
    low = T.mla_decode_ref(q, kc, table, seqlens, 512, causal=causal, compute_dtype=dtype)
    check_mla(out, lse, *ref, low[0], input_dtype=dtype)


def test_dense_decode_unaligned_q(device):
    """q rows that are not 16-byte aligned take the portable kernel; same results."""
    B, Sq, Hq, P = 2, 1, 16, 64
    lens = [150, 77]
    kc, table = paged_cache(lens, P, 1, 576)
    big = torch.randn(B, Sq, Hq, 577, dtype=BF16)
    q = big[..., 1:]  # offset by one element
    seqlens = torch.tensor(lens, dtype=torch.int32)
    qd = big.to(device)[..., 1:]
    out, lse = fm.flash_mla_with_kvcache(qd, kc.to(device), table.to(device), seqlens.to(device), 512, None, None)
    ref = T.mla_decode_ref(q, kc, table, seqlens, 512)
    low = T.mla_decode_ref(q, kc, table, seqlens, 512, compute_dtype=BF16)
    check_mla(out, lse, *ref, low[0])


def _poison_unreferenced(cache, idx_lists, layout):
    """Every token slot that no valid index names is poisoned: bf16 NaN values, or 0x7f bytes
    (the e4m3 NaN in every latent byte; huge finite scales and rope values for V3.2) and, for
    MODEL1, 0xff scale bytes (the ue8m0 NaN). A kernel that reads an unselected token leaks NaN
    into the output."""
    nb, P = cache.shape[:2]
    used = torch.zeros(nb * P, dtype=torch.bool)
    for idx in idx_lists:
        used[idx[(idx >= 0) & (idx < nb * P)].long()] = True
    unused = (~used).nonzero().flatten().tolist()
    if layout is None:
        cache.view(nb * P, -1)[~used] = float("nan")
    elif layout == "v32":
        cache.view(nb * P, -1)[~used] = 0x7F
    else:  # MODEL1: per block, P x 576 data bytes, then P x 8 scale bytes
        raw = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
        stride = cache.stride(0)
        for slot in unused:
            blk, off = divmod(slot, P)
            raw[blk * stride + off * 576: blk * stride + (off + 1) * 576] = 0x7F
            raw[blk * stride + P * 576 + off * 8: blk * stride + P * 576 + off * 8 + 7] = 0xFF
    return cache


@pytest.mark.parametrize("B,Sq,Hq,topk,layout,extra,sink", [
    (2, 1, 128, 200, None, True, "finite"),
    (4, 2, 64, 100, "v32", False, None),
    (3, 1, 128, 333, "v32", True, "+inf"),
    (1, 4, 16, 2048, "v32", False, "-inf"),
    (2, 2, 128, 64, "model1", False, "finite"),
    (3, 1, 16, 150, "model1", True, None),
])
def test_sparse_decode_paths(device, B, Sq, Hq, topk, layout, extra, sink):
    gen = torch.Generator().manual_seed(topk + Hq)
    dqk = 512 if layout == "model1" else 576
    P, nb = 64, 40
    kv = torch.randn(nb, P, 1, dqk, dtype=BF16, generator=gen)
    idx = torch.randint(-1, nb * P + 50, (B, Sq, topk), dtype=torch.int32, generator=gen)
    idx[0, 0] = -1  # a row with no valid index
    kw = dict(indices=idx, topk_length=torch.randint(topk // 2, topk + 1, (B,), dtype=torch.int32, generator=gen))
    lists = [idx]
    if extra:
        ekv = torch.randn(4, 16, 1, dqk, dtype=BF16, generator=gen)
        eidx = torch.randint(-1, 64, (B, Sq, 37), dtype=torch.int32, generator=gen)
        kw.update(extra_indices_in_kvcache=eidx, extra_topk_length=torch.randint(0, 38, (B,), dtype=torch.int32,
                                                                                  generator=gen))
    if sink is not None:
        kw["attn_sink"] = (torch.randn(Hq, generator=gen) if sink == "finite"
                           else torch.full((Hq,), math.inf if sink == "+inf" else -math.inf))
    fp8 = layout is not None
    cache = fm.quantize_k_cache(kv, layout) if fp8 else kv
    cache = _poison_unreferenced(cache, lists, layout)
    if extra:
        kw["extra_k_cache"] = fm.quantize_k_cache(ekv, layout) if fp8 else ekv
    q = torch.randn(B, Sq, Hq, dqk, dtype=BF16, generator=gen)
    dev = {k: T.to_device_keeping_layout(v, device) for k, v in kw.items()}
    out, lse = fm.flash_mla_with_kvcache(q.to(device), T.to_device_keeping_layout(cache, device), None, None, 512,
                                         None, None, is_fp8_kvcache=fp8, **dev)
    ref = T.mla_decode_ref(q, cache, None, None, 512, is_fp8_kvcache=fp8, **kw)
    low = T.mla_decode_ref(q, cache, None, None, 512, is_fp8_kvcache=fp8, compute_dtype=BF16, **kw)
    check_mla(out, lse, *ref, low[0])
    assert (out[0, 0].float() == 0).all() or extra, "a row with no valid index must give zeros"
    assert torch.isfinite(out.float()).all(), "an unselected (NaN) token leaked into the output"


def test_sparse_prefill_many_heads(device):
    """Sparse prefill at 128 heads (two row blocks per query on the device), topk not a multiple of 64."""
    gen = torch.Generator().manual_seed(5)
    Sq, Hq, Skv, topk = 45, 128, 700, 200
    q = torch.randn(Sq, Hq, 576, dtype=BF16, generator=gen)
    kv = torch.randn(Skv, 1, 576, dtype=BF16, generator=gen)
    idx = torch.randint(-1, Skv + 5, (Sq, 1, topk), dtype=torch.int32, generator=gen)
    used = torch.zeros(Skv, dtype=torch.bool)
    used[idx[(idx >= 0) & (idx < Skv)].long()] = True
    kv[~used] = float("nan")  # unselected rows must never be read
    kw = dict(attn_sink=torch.randn(Hq, generator=gen))
    out, max_logits, lse = fm.flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), 0.04, 512,
                                                   **{k: v.to(device) for k, v in kw.items()})
    ref_out, ref_max, ref_lse = T.mla_sparse_prefill_ref(q, kv, idx, 0.04, 512, **kw)
    low = T.mla_sparse_prefill_ref(q, kv, idx, 0.04, 512, compute_dtype=BF16, **kw)
    check_mla(out, lse, ref_out, ref_lse, low[0])
    torch.testing.assert_close(max_logits.cpu(), ref_max, atol=1e-3, rtol=1e-4)


def test_metadata_shapes_match_fake(device):
    """get_mla_metadata's real shapes equal its fake kernel's (device: one part per multiprocessor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    lens = torch.randint(0, 500, (7,), dtype=torch.int32).to(device)
    for args in ((128, 1), (16, 1), (512, 1)):
        meta, splits = torch.ops.mate.get_mla_metadata(lens, *args)
        with FakeTensorMode() as mode:
            fmeta, fsplits = torch.ops.mate.get_mla_metadata(mode.from_tensor(lens), *args)
        assert meta.shape == fmeta.shape and splits.shape == fsplits.shape
        assert splits.cpu()[-1].item() >= 7 and splits.cpu()[0].item() == 0


def _schedule_ref(lens, parts, fixed_keys=None):
    """get_mla_metadata's schedule written out plainly: the sequences' 64-key blocks (at least
    one each) dealt out in equal runs of ceil(total / parts) blocks."""
    blocks = [max(1, -(-(fixed_keys if fixed_keys is not None else max(0, n)) // 64)) for n in lens]
    total = sum(blocks)
    per_part = max(1, -(-total // parts))
    starts = [0]
    for nb in blocks:
        starts.append(starts[-1] + nb)

    def locate(g):
        if g >= total:
            return len(lens), 0
        b = max(i for i in range(len(lens)) if starts[i] <= g)
        return b, g - starts[b]

    rows, first = [], 0
    for p in range(parts):
        b0, k0 = locate(min(p * per_part, total))
        b1, k1 = locate(min((p + 1) * per_part, total))
        rows.append([b0, k0, b1, k1, first, 0, 0, 0])
        first += (b1 - b0) + (1 if k1 > 0 else 0)
    splits = [0]
    for b in range(len(lens)):
        touched = sum(1 for r in rows if (r[0], r[1]) <= (b, blocks[b] - 1) and (r[2], r[3]) > (b, 0)
                      and (r[0], r[1]) != (r[2], r[3]))
        splits.append(splits[-1] + max(1, touched))
    return rows, splits


@pytest.mark.parametrize("B,topk", [(1, None), (7, None), (300, None), (2500, None), (64, 2048), (4096, 200)])
def test_metadata_schedule_contents(device, B, topk):
    """get_mla_metadata's rows and cumulative splits on every device equal the plain schedule
    (the device computes it with a parallel prefix-sum kernel, the CPU with the sequential loop)."""
    gen = torch.Generator().manual_seed(B)
    lens = torch.randint(0, 3000, (B,), dtype=torch.int32, generator=gen)
    lens[: B // 3] = 0
    kw = {} if topk is None else dict(topk=topk)
    meta, splits = torch.ops.mate.get_mla_metadata(lens.to(device), 128, 1, **kw)
    rows, ref_splits = _schedule_ref(lens.tolist(), meta.shape[0], topk)
    assert meta.cpu().tolist() == rows
    assert splits.cpu().tolist() == ref_splits


@pytest.mark.parametrize("dqk,dv,dtype,Hkv", [(64, 32, BF16, 1), (1024, 1024, torch.float32, 1), (320, 256, BF16, 2),
                                             (576, 576, BF16, 1)])
def test_dense_decode_other_head_dims(device, dqk, dv, dtype, Hkv):
    """Head dims the tensor-core kernel does not take (the device's portable kernel): small,
    the 1024 maximum, head_dim_v = head_dim (V includes the rope part), GQA."""
    gen = torch.Generator().manual_seed(dqk + dv)
    lens = [90, 0, 33]
    kc, table = paged_cache(lens, 16, Hkv, dqk, dtype=dtype, gen=gen)
    q = torch.randn(3, 2, 4 * Hkv, dqk, dtype=dtype, generator=gen)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = fm.flash_mla_with_kvcache(q.to(device), kc.to(device), table.to(device), seqlens.to(device), dv,
                                         None, None, causal=True)
    ref = T.mla_decode_ref(q, kc, table, seqlens, dv, causal=True)
    low = T.mla_decode_ref(q, kc, table, seqlens, dv, causal=True, compute_dtype=dtype)
    check_mla(out, lse, *ref, low[0], input_dtype=dtype)
