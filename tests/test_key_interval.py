"""The key-interval invariant of the masks (SEMANTICS §1, "Masks").

Every mask (causal, local window, attention chunk, the key length, context parallel) lets a
query row see one contiguous interval of keys, and both ends of that interval are
non-decreasing as the row grows. csrc/common/fmha_score.h (key_range_for_row) states this;
the tensor-core kernels (csrc/musa/arch/sm80) rely on it to bound a block of rows by its
first and last row. A new mask that broke it must fail here.

Nothing here uses a private API. Which keys a row sees is read from outputs: with q = 0 every
allowed key gets the same weight, and with one-hot values (v[j] = e_j, Dv >= Sk) the output
row is 1/n on exactly the n allowed keys and 0 elsewhere. That is done for the oracle
(mate_ops.testing.fmha_ref, fp64) and for the real op (torch.ops.mate.fmha_fwd).
"""
import math
import random

import pytest
import torch

from mate_ops import testing as T

BIG = 2**31 - 1


def _one_hot_inputs(sq, sk, dv, dtype, heads=2, heads_k=1, d=16):
    q = torch.zeros(1, sq, heads, d, dtype=dtype)
    k = torch.randn(1, sk, heads_k, d).to(dtype)  # any keys: q = 0 makes every score 0
    v = torch.zeros(1, sk, heads_k, dv, dtype=dtype)
    idx = torch.arange(sk)
    v[0, idx, :, idx] = 1
    return q, k, v


def _seen(out, sk):
    """(H, Sq, Sk) bool: which keys each (head, row) saw, from one-hot outputs (1, Sq, H, Dv)."""
    return (out[0, :, :, :sk].float() > 0).permute(1, 0, 2)


def _intervals(rows):
    """[(lo, hi) or None] per row of a (Sq, Sk) bool mask; asserts each row is contiguous."""
    res = []
    for i, row in enumerate(rows.tolist()):
        js = [j for j, x in enumerate(row) if x]
        if not js:
            res.append(None)
            continue
        assert js == list(range(js[0], js[-1] + 1)), f"row {i}: allowed keys {js} are not one interval"
        res.append((js[0], js[-1] + 1))
    return res


def _assert_monotone(intervals, what):
    prev = None
    for i, iv in enumerate(intervals):
        if iv is None:
            continue
        if prev is not None:
            assert iv[0] >= prev[0] and iv[1] >= prev[1], (
                f"{what}: row {i} sees keys [{iv[0]}, {iv[1]}) but an earlier row sees [{prev[0]}, {prev[1]}): "
                "an interval end moved left as the row grew")
        prev = iv


def _rule(sq, sk_local, sk_mask, causal, left, right, chunk, w, r):
    """The interval rule of key_range_for_row (fmha_score.h), clamped ends included, for every
    row: [lo, hi) local keys with lo <= hi (hi == lo for an empty row)."""
    if causal:
        right = 0
    res = []
    for i in range(sq):
        a = i + sk_mask - sq
        glo, ghi = 0, sk_mask
        if left >= 0:
            glo = max(glo, a - left)
        if right >= 0:
            ghi = min(ghi, a + right + 1)
        if chunk > 0:
            start = (a // chunk) * chunk
            glo, ghi = max(glo, start), min(ghi, start + chunk)
        ghi = max(ghi, glo)
        lo = min(max(0, -((r - glo) // w)), sk_local)  # ceil((glo - r) / w)
        hi = max(lo, min(sk_local, -((r - ghi) // w)))
        res.append((lo, hi))
    return res


def _random_case(rng):
    sq = rng.choice([1, 2, 3, rng.randint(1, 24), rng.randint(1, 70)])
    sk = rng.choice([1, 2, rng.randint(1, 24), rng.randint(1, 64)])
    w = rng.choice([1, 1, 1, 2, 3, 4, 7])
    rank = rng.randrange(w)
    sk_mask = sk if w == 1 else rng.choice([w * sk, rng.randint(0, w * sk + 5), w * sk - rng.randint(0, w)])
    sk_mask = max(sk_mask, 0)
    span = max(sq, sk_mask) + 3

    def side():
        return rng.choice([-1, -1, 0, rng.randint(0, span), rng.randint(0, 3 * span), BIG, BIG - 1, 2**30])

    left, right = side(), side()
    chunk = rng.choice([0, 0, 0, 1, rng.randint(1, span), rng.randint(1, 3 * span), BIG, 2**30 + 1])
    causal = rng.random() < 0.4
    return sq, sk, sk_mask, causal, left, right, chunk, w, rank


def _op_kwargs(sk, sk_mask, causal, left, right, chunk, w, rank):
    kw = dict(causal=causal, window_size_left=left, window_size_right=right, attention_chunk=chunk)
    if w > 1:
        kw.update(cp_world_size=w, cp_rank=rank, cp_tot_seqused_k=torch.tensor([sk_mask], dtype=torch.int32))
    return kw


def _oracle_seen(q, k, v, sk, sk_mask, causal, left, right, chunk, w, rank):
    kw = dict(causal=causal, window_size=(left, right), attention_chunk=chunk)
    if w > 1:
        kw.update(cp_world_size=w, cp_rank=rank, cp_tot_seqused_k=torch.tensor([sk_mask], dtype=torch.int32))
    out, lse = T.fmha_ref(q, k, v, **kw)
    return _seen(out, sk), out, lse


@pytest.mark.parametrize("seed", range(8))
def test_oracle_masks_are_monotone_intervals(seed):
    """The oracle's allowed sets: one interval per row, both ends non-decreasing, and equal to
    the interval rule of key_range_for_row (whose clamped ends are monotone for every row)."""
    rng = random.Random(1000 + seed)
    for _ in range(40):
        case = _random_case(rng)
        sq, sk, sk_mask, causal, left, right, chunk, w, rank = case
        q, k, v = _one_hot_inputs(sq, sk, sk, torch.float64)
        seen, _, _ = _oracle_seen(q, k, v, *case[1:])
        rule = _rule(sq, sk, sk_mask, causal, left, right, chunk, w, rank)
        _assert_monotone(rule, f"rule {case}")
        for h in range(seen.shape[0]):
            ivs = _intervals(seen[h])
            _assert_monotone(ivs, f"oracle {case}")
            assert ivs == [iv if iv[0] < iv[1] else None for iv in rule], f"oracle vs rule, case {case}"


def _check_op(device, dtype, dv_of, cases, num_splits_choices):
    rng = random.Random(7)
    for case in cases:
        sq, sk, sk_mask, causal, left, right, chunk, w, rank = case
        dv = dv_of(sk)
        q, k, v = _one_hot_inputs(sq, sk, dv, dtype, d=dv if dtype != torch.float32 else 16)
        seen_ref, _, _ = _oracle_seen(q.double(), k.double(), v.double(), *case[1:])
        kw = _op_kwargs(sk, sk_mask, causal, left, right, chunk, w, rank)
        kw = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
        out, lse = torch.ops.mate.fmha_fwd(q.to(device), k.to(device), v.to(device),
                                           num_splits=rng.choice(num_splits_choices), **kw)
        out, lse = out.cpu().float(), lse.cpu()
        seen = _seen(out, sk)
        assert torch.equal(seen, seen_ref), f"{device} op saw other keys than the oracle, case {case}"
        n = seen.sum(-1)  # (H, Sq) allowed keys per row
        # allowed keys weigh 1/n each, lse = log n; rows without keys: out 0, lse -inf
        expect = torch.where(seen, 1.0 / n.clamp(min=1).unsqueeze(-1).float(), torch.zeros(()))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[0, :, :, :sk].permute(1, 0, 2), expect, atol=tol, rtol=tol)
        assert torch.all(out[0, :, :, sk:] == 0)
        expect_lse = torch.where(n > 0, n.double().log(), torch.full((), -math.inf, dtype=torch.float64))
        torch.testing.assert_close(lse[0].double(), expect_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_op_sees_the_oracle_intervals(device, seed):
    """fp32 (the CPU reference; on a GPU the portable row / decode kernels): every row of the op
    sees exactly the oracle's keys, including huge windows and chunks and context parallel."""
    rng = random.Random(seed)
    cases = [_random_case(rng) for _ in range(40)]
    _check_op(device, torch.float32, lambda sk: sk, cases, [1, 1, 2, 3])


def test_op_intervals_long_keys(device):
    """Dv = Sk up to 512 (more than one CPU key tile of 256, several split blocks of 128)."""
    rng = random.Random(11)
    cases = []
    for sk in (129, 300, 512):
        for _ in range(4):
            case = list(_random_case(rng))
            case[0] = rng.choice([1, 5, 40])
            case[1] = sk
            w, rank = case[7], case[8]
            case[2] = sk if w == 1 else max(0, w * sk - rng.randint(0, w))
            cases.append(tuple(case))
    _check_op(device, torch.float32, lambda sk: sk, cases, [1, 2, 4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_intervals_tensor_core_shapes(device, dtype):
    """bf16/fp16 with D = Dv in {64, 128, 256} (the tensor-core kernel on a GPU): one-hot values
    padded to Dv, so blocks of many rows of every mask are bounded by their first and last row."""
    rng = random.Random(5)
    cases = []
    for _ in range(30):
        case = list(_random_case(rng))
        case[0] = rng.choice([case[0], rng.randint(17, 140)])  # several row blocks
        cases.append(tuple(case))
    _check_op(device, dtype, lambda sk: 64 if sk <= 64 else (128 if sk <= 128 else 256), cases, [1, 2])
