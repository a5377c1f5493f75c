"""Regression tests: masks with windows, chunks and lengths near 2^31 - 1.

window_size and attention_chunk are legal up to 2^31 - 1, so the key-range maths must not
overflow int32 (a - left, a + right + 1, floor(a / c) * c + c, i + Sk - Sq, j * W + r, the
split ranges and the key loops). Each case is compared with the oracle
(mate_ops.testing.fmha_ref, Python / int64 maths that cannot overflow) on random inputs, or,
for key lengths near 2^31 that no oracle can materialize, with the closed form of attention
over identical keys (expanded k / v of stride 0).
"""
import math

import pytest
import torch

from test_key_interval import _rule as interval_rule

from mate_ops import mha_interface as mi
from mate_ops import testing as T

BIG = 2**31 - 1


def _check(out, lse, out_ref, lse_ref):
    out, lse = out.cpu().double(), lse.cpu()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, out_ref.double(), atol=2e-5, rtol=1e-5)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "lse: empty rows differ from the oracle"
    assert torch.equal(lse[~finite], lse_ref[~finite])
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=2e-5, rtol=1e-5)


def _varlen(device, sq_list, sk_list, num_splits=1, heads=4, heads_k=2, d=16, **kw):
    """flash_attn_varlen_func on random fp32 inputs against fmha_ref."""
    cu_q, cu_k = T.random_cu_seqlens(sq_list), T.random_cu_seqlens(sk_list)
    q = torch.randn(sum(sq_list), heads, d)
    k = torch.randn(sum(sk_list), heads_k, d)
    v = torch.randn(sum(sk_list), heads_k, d)
    out_ref, lse_ref = T.fmha_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    dev = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out, lse = mi.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                         max(sq_list), max(sk_list), num_splits=num_splits,
                                         return_softmax_lse=True, **dev)
    _check(out, lse, out_ref, lse_ref)
    return out_ref, lse_ref


# The three defects as reported: unmasked attention gave out 0 / lse -inf; Sq > Sk emptied rows;
# a chunk of 2^31 - 1 with Sq > Sk let rows see keys outside their chunk.
def test_unbounded_left_huge_right(device):
    out_ref, lse_ref = _varlen(device, [4], [6], window_size=(-1, BIG))
    assert torch.isfinite(lse_ref).all()  # every row sees every key


def test_huge_left_with_more_queries_than_keys(device):
    out_ref, lse_ref = _varlen(device, [6], [4], window_size=(BIG, -1))
    assert torch.isfinite(lse_ref).all()


def test_huge_chunk_with_more_queries_than_keys(device):
    _, lse_ref = _varlen(device, [20, 6], [4, 4], attention_chunk=BIG)
    # rows with a = i + Sk - Sq < 0 lie in chunk [-c, 0): no keys
    assert torch.isinf(lse_ref[:, :16]).all() and torch.isfinite(lse_ref[:, 16:20]).all()
    assert torch.isinf(lse_ref[:, 20:22]).all() and torch.isfinite(lse_ref[:, 22:]).all()


SIBLINGS = [
    # (sq per sequence, sk per sequence, options)
    ([4, 6, 1], [6, 4, 5], dict(window_size=(BIG, BIG))),
    ([5, 9], [9, 3], dict(window_size=(BIG - 1, 0))),
    ([9, 3], [3, 9], dict(window_size=(BIG, -1), causal=True)),
    ([3, 12], [9, 3], dict(window_size=(0, BIG))),
    ([12, 2], [3, 7], dict(window_size=(BIG, 0))),
    ([7, 4], [4, 7], dict(window_size=(2**30, 2**30 + 1))),
    ([20, 5], [4, 9], dict(attention_chunk=BIG)),
    ([20, 5], [4, 9], dict(attention_chunk=BIG - 1, window_size=(BIG, BIG))),
    ([7, 13], [3, 5], dict(attention_chunk=2**30 + 1, causal=True)),
    ([30, 3], [5, 8], dict(attention_chunk=2**30, window_size=(2, BIG))),
    ([8, 8], [3, 8], dict(attention_chunk=BIG, window_size=(-1, BIG))),
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", range(len(SIBLINGS)))
def test_huge_windows_and_chunks(device, case, num_splits):
    sq, sk, kw = SIBLINGS[case]
    _varlen(device, sq, sk, num_splits=num_splits, **kw)


# Context parallel: the mask length is cp_tot_seqused_k (any int32 >= 0), so the anchor
# i + Sk - Sq overflowed for Sk near 2^31; a huge world size overflowed j * W + r.
CP_CASES = [
    (2, 1, dict(causal=True)),                                 # every local key is allowed
    (2, 0, dict(window_size=(BIG - 8, -1))),                   # a - left cuts the local keys
    (2, 1, dict(window_size=(BIG - 6, 0), attention_chunk=BIG - 3)),
    (3, 2, dict(attention_chunk=BIG)),                         # chunk [0, 2^31 - 1)
    (2**30, 3, dict(causal=True)),                             # j * W + r passes 2^31 for j >= 2
    (2**30, 5, dict(window_size=(BIG - 4, 3))),
    (BIG, BIG - 1, dict(causal=False)),                        # the largest world, the last rank
]


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("case", range(len(CP_CASES)))
def test_context_parallel_huge_global_length(device, case, alibi):
    w, rank, kw = CP_CASES[case]
    sq, sk, heads, d = 5, 6, 2, 16
    q, k, v = torch.randn(1, sq, heads, d), torch.randn(1, sk, heads, d), torch.randn(1, sk, heads, d)
    tot = torch.tensor([BIG], dtype=torch.int32)
    kw = dict(kw, cp_world_size=w, cp_rank=rank, cp_tot_seqused_k=tot)
    # ALiBi over distances near 2^31: tiny slopes keep the logits O(1)
    slopes = torch.tensor([3e-10, 7e-10]) if alibi else None
    out_ref, lse_ref = T.fmha_ref(q, k, v, alibi_slopes=slopes, **kw)
    window = kw.pop("window_size", (-1, -1))
    dev = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    for num_splits in (1, 2):
        out, lse = torch.ops.mate.fmha_fwd(q.to(device), k.to(device), v.to(device), window_size_left=window[0],
                                           window_size_right=window[1], num_splits=num_splits,
                                           alibi_slopes=slopes.to(device) if alibi else None, **dev)
        _check(out, lse, out_ref, lse_ref)


HUGE_SK = [
    dict(causal=True, window_size=(2, -1)),
    dict(window_size=(5, BIG)),
    dict(window_size=(3, 1)),
    dict(causal=True, window_size=(40, -1), attention_chunk=7),
    dict(window_size=(1, 0), attention_chunk=BIG - 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", range(len(HUGE_SK)))
def test_key_length_near_int32_max(device, case, num_splits, dtype):
    """Sk = 2^31 - 1 keys, all equal (k and v expanded with stride 0), windows keep a few of
    them: key loops, tiles and splits ending at 2^31 - 1 must not overflow. With equal keys
    the output is v and lse = s + log(n) for n allowed keys."""
    kw = dict(HUGE_SK[case])
    sq, heads, d = 3, 2, 64
    q = torch.randn(1, sq, heads, d).to(dtype)
    k0, v0 = torch.randn(d).to(dtype), torch.randn(d).to(dtype)
    # no memory: stride 0, expanded on the device itself (.to() of an expanded tensor materializes it)
    k, v = k0.to(device).expand(1, BIG, 1, d), v0.to(device).expand(1, BIG, 1, d)
    window = kw.pop("window_size", (-1, -1))
    causal, chunk = kw.get("causal", False), kw.get("attention_chunk", 0)
    out, lse = torch.ops.mate.fmha_fwd(q.to(device), k, v, window_size_left=window[0],
                                       window_size_right=window[1], num_splits=num_splits, **kw)
    out, lse = out.cpu().double(), lse.cpu().double()
    s = (q.double()[0] @ k0.double()) / math.sqrt(d)  # (sq, heads)
    rows = interval_rule(sq, BIG, BIG, causal, window[0], window[1], chunk, 1, 0)  # keys row i sees
    for i in range(sq):
        lo, hi = rows[i]
        n = hi - lo
        assert n > 0
        for h in range(heads):
            torch.testing.assert_close(out[0, i, h], v0.double(), atol=1e-2 if dtype != torch.float32 else 1e-5,
                                       rtol=0)
            torch.testing.assert_close(lse[0, h, i].item(), s[i, h].item() + math.log(n), atol=2e-2, rtol=1e-5)
