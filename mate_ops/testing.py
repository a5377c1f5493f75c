"""Pure-PyTorch reference oracle for mate_ops (SEMANTICS.md sections 1 and 2).

This module is deliberately slow and simple: per-sequence Python loops, explicit
boolean masks, no fused kernels and no dependence on the compiled extension.  It
imports only ``torch``, ``math`` and ``typing`` so it can be used to test any
backend (CPU reference, device kernels, fake kernels).

Public functions
----------------
- :func:`fmha_ref`        -- FMHA forward (flash_attn_func / varlen / with_kvcache
                             attention part, without append/rotary).
- :func:`combine_ref`     -- flash_attn_combine.
- :func:`assert_close_fa3` -- FlashAttention-3's "2x the low-precision reference
                             error" tolerance rule.
- :func:`poison_`, :func:`random_seqlens`, :func:`random_cu_seqlens`,
  :func:`make_paged_kv`   -- small helpers for tests.

Decisions on points SEMANTICS.md leaves open (each one follows FlashAttention-3
where FA3 decides it):

- All masking lengths are the per-sequence *effective* ones: ``Sq`` is
  ``seqused_q[b]`` when given (else the sequence's q length) and ``Sk`` is
  ``end - leftpad`` (or ``cp_tot_seqused_k[b]`` under context parallelism).
- Window sizes: any negative value (not only -1) means "unbounded on that side".
- ``q_descale``/``k_descale``/``v_descale`` are only applied when the inputs are
  FP8 (FA3 ignores them otherwise).  They are indexed by the *query* batch index
  ``b`` (not by ``cache_batch_idx[b]``), as FA3 does.  Any tensor broadcastable
  to ``(B, Hk)`` is accepted.
- The learnable sink is neither scaled nor soft-capped.
- ``cp_tot_seqused_k`` is ignored when ``cp_world_size == 1`` and required
  (shape ``(B,)``) when ``cp_world_size > 1``.
- ``cache_leftpad[b] > end`` (negative effective key length), out-of-range
  ``cache_batch_idx`` / page ids, or key ranges that would read outside the
  given tensors raise ``ValueError`` (the oracle never silently clamps).
- With ``cu_seqlens_k`` and ``seqused_k`` both given, sequence b's keys start
  at row ``cu_seqlens_k[b]`` and there are ``seqused_k[b]`` of them (FA3); the
  oracle only checks that they lie inside ``k``.
- Query rows that belong to no sequence (ragged q with ``Tq > cu_seqlens_q[-1]``)
  are written like padded rows: out 0, lse -inf.
- combine: a split whose lse is NaN or -inf is excluded from the total lse too,
  and its (possibly garbage / NaN) partial output contributes exactly 0.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

__all__ = [
    "fmha_ref",
    "combine_ref",
    "rotary_ref",
    "kvcache_append_ref",
    "assert_close_fa3",
    "DEFAULT_ATOL",
    "poison_",
    "random_seqlens",
    "random_cu_seqlens",
    "make_paged_kv",
]

_FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

#: Default absolute tolerance of :func:`assert_close_fa3`, keyed by the dtype of
#: the *inputs* that produced the output under test (FA3's test-suite values).
#: FP8 inputs produce bf16 outputs, so pass ``input_dtype=torch.float8_e4m3fn``
#: (or an explicit ``atol``) for fp8-derived outputs.
DEFAULT_ATOL = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
}
for _d in _FP8_DTYPES:
    DEFAULT_ATOL[_d] = 5e-2
del _d


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_DTYPES


def _ints(t: Optional[Tensor], name: str) -> Optional[list]:
    """Copy an integer index tensor to a Python list (validating it is integer)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return [int(x) for x in t]
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return [int(x) for x in t.detach().cpu().reshape(-1).tolist()]


def _check_len(lst: Optional[list], n: int, name: str) -> None:
    if lst is not None and len(lst) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(lst)}")


def _allowed_mask(
    sq: int,
    sk: int,
    cols: Tensor,
    causal: bool,
    window_size: Tuple[int, int],
    attention_chunk: int,
) -> Tensor:
    """Boolean mask (sq, len(cols)): may query row i attend to key at column cols[n]?

    ``cols`` are the (global, leftpad-shifted) key columns used for masking,
    ``sq``/``sk`` the effective query/key lengths. Implements SEMANTICS 1 "Masks"
    literally: a = i + sk - sq; window [a - left, a + right] with negative sides
    unbounded; causal == right 0; attention chunk [floor(a/c)*c, +c); j in [0, sk).
    """
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    i = torch.arange(sq, dtype=torch.int64).unsqueeze(1)  # (sq, 1)
    j = cols.to(torch.int64).unsqueeze(0)  # (1, nk)
    a = i + sk - sq
    allowed = (j >= 0) & (j < sk)
    if left >= 0:
        allowed = allowed & (j >= a - left)
    if right >= 0:
        allowed = allowed & (j <= a + right)
    if attention_chunk > 0:
        c = int(attention_chunk)
        start = torch.div(a, c, rounding_mode="floor") * c  # Python-style floor
        allowed = allowed & (j >= start) & (j < start + c)
    return allowed


def fmha_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    seqused_q: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None,
    page_table: Optional[Tensor] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    qv: Optional[Tensor] = None,
    q_descale: Optional[Tensor] = None,
    k_descale: Optional[Tensor] = None,
    v_descale: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    learnable_sink: Optional[Tensor] = None,
    attention_chunk: int = 0,
    softcap: float = 0.0,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference FMHA forward exactly as SEMANTICS.md section 1 specifies.

    Layouts
        * q dense ``(B, Sq, H, D)`` -> out ``(B, Sq, H, Dv)``, lse ``(B, H, Sq)``.
        * q ragged (``cu_seqlens_q`` (B+1,) given) ``(Tq, H, D)`` -> out
          ``(Tq, H, Dv)``, lse ``(H, Tq)``.
        * k/v dense ``(B_or_cache_rows, Sk, Hk, D/Dv)``; ragged ``(Tk, Hk, D/Dv)``
          with ``cu_seqlens_k``; paged ``(num_pages, page_size, Hk, D/Dv)`` with
          ``page_table (B_or_rows, max_pages)`` and ``seqused_k`` (required).
        lse is always float32 (natural log).

    Per sequence b: keys are the cache positions ``t in [leftpad[b], end)`` with
    ``end = seqused_k[b]`` if given, else the stored length; their masking column
    is ``t - leftpad[b]`` and the effective key length ``end - leftpad[b]``.
    ``cache_batch_idx[b]`` selects the dense cache row / page-table row.  Query
    rows ``>= seqused_q[b]`` are written as out 0, lse -inf.  Under context
    parallelism (``cp_world_size W > 1``) local column j is global key
    ``j * W + cp_rank`` and masks use ``Sk = cp_tot_seqused_k[b]``.

    Scores ``s = scale * (<q_i, k_j> [+ <qv_i, v_j>])`` (default scale
    ``1/sqrt(D)``, or ``1/sqrt(D + Dv)`` with qv), then softcap
    ``softcap * tanh(s / softcap)``, then the causal/window/chunk mask
    (bottom-right aligned).  GQA: query head h reads kv head ``h // (H // Hk)``.
    ``learnable_sink (H,)``: unscaled extra logit that only joins the softmax
    denominator; the returned lse includes it.  Rows with no allowed key: out 0,
    lse -inf (or lse = sink with a sink).  FP8 inputs are dequantized as
    ``x.float() * descale[b, kv_head]`` (q_descale also scales qv) and give a
    bf16 output by default; otherwise the output dtype is ``q.dtype``.

    ``compute_dtype`` selects the precision of the math:

    * ``torch.float64`` (default): the accurate oracle; every step in fp64.
    * a low precision (``torch.float32``, ``torch.float16``, ``torch.bfloat16``):
      FA3's "same-precision reference" (FlashAttention's ``attention_ref`` with
      ``upcast=False``): effective q/k/v/qv are rounded to ``compute_dtype``, the
      score matmuls run in ``compute_dtype`` (result rounded to it), scaling,
      softcap, masking and softmax/lse run in float32, the probabilities are
      rounded to ``compute_dtype`` before ``P @ V`` which also runs in
      ``compute_dtype``.
    * ``torch.float8_e4m3fn``: FA3's FP8 low-precision reference: as bfloat16
      above, but the probabilities are additionally rounded through
      float8_e4m3fn before ``P @ V`` (``intermediate_dtype=fp8`` in FA3's tests).

    Use it with :func:`assert_close_fa3`:
    ``assert_close_fa3(out, fmha_ref(...)[0], fmha_ref(..., compute_dtype=torch.bfloat16)[0])``.

    Returns ``(out, lse)``.
    """
    # ------------------------------------------------------------------ setup
    if compute_dtype == torch.float64:
        acc = torch.float64  # dtype of everything
        mm_dtype = torch.float64
        p_round = None
    elif compute_dtype in (torch.float32, torch.float16, torch.bfloat16):
        acc = torch.float32
        mm_dtype = compute_dtype
        p_round = None
    elif _is_fp8(compute_dtype):
        acc = torch.float32
        mm_dtype = torch.bfloat16
        p_round = compute_dtype
    else:
        raise ValueError(f"unsupported compute_dtype {compute_dtype}")

    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if qv is not None and qv.dtype != q.dtype:
        raise ValueError(f"qv must have q's dtype {q.dtype}, got {qv.dtype}")
    is_fp8 = _is_fp8(q.dtype)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if is_fp8 else q.dtype

    ragged_q = cu_seqlens_q is not None
    paged = page_table is not None
    ragged_k = cu_seqlens_k is not None
    if paged and ragged_k:
        raise ValueError("page_table and cu_seqlens_k are mutually exclusive")
    if ragged_k and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx needs a dense or paged k/v cache, not cu_seqlens_k")

    # q geometry
    if ragged_q:
        if q.dim() != 3:
            raise ValueError(f"ragged q must be (Tq, H, D), got shape {tuple(q.shape)}")
        cuq = _ints(cu_seqlens_q, "cu_seqlens_q")
        B = len(cuq) - 1
        if B < 0 or cuq[0] != 0 or any(cuq[b + 1] < cuq[b] for b in range(B)) or cuq[-1] > q.shape[0]:
            raise ValueError(f"invalid cu_seqlens_q {cuq} for q with {q.shape[0]} rows")
        H, D = q.shape[1], q.shape[2]
    else:
        if q.dim() != 4:
            raise ValueError(f"dense q must be (B, Sq, H, D), got shape {tuple(q.shape)}")
        B, H, D = q.shape[0], q.shape[2], q.shape[3]
        cuq = None

    # k/v geometry
    if paged or not ragged_k:
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError("dense/paged k and v must be 4-D")
    else:
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError("ragged k and v must be (Tk, Hk, D)")
    Hk, Dk, Dv = k.shape[-2], k.shape[-1], v.shape[-1]
    if Dk != D:
        raise ValueError(f"k head dim {Dk} != q head dim {D}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"H={H} must be a multiple of Hk={Hk}")
    G = H // Hk
    kv_head_of = [h // G for h in range(H)]  # GQA: query head h -> kv head h // G

    if qv is not None:
        if qv.shape[:-1] != q.shape[:-1] or qv.shape[-1] != Dv:
            raise ValueError(f"qv must be q's shape with last dim Dv={Dv}, got {tuple(qv.shape)}")

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D + Dv) if qv is not None else 1.0 / math.sqrt(D)
    softmax_scale = float(softmax_scale)
    softcap = float(softcap)

    cuk = _ints(cu_seqlens_k, "cu_seqlens_k")
    if ragged_k:
        _check_len(cuk, B + 1, "cu_seqlens_k")
    used_q = _ints(seqused_q, "seqused_q")
    used_k = _ints(seqused_k, "seqused_k")
    leftpad = _ints(cache_leftpad, "cache_leftpad")
    batch_idx = _ints(cache_batch_idx, "cache_batch_idx")
    for lst, nm in ((used_q, "seqused_q"), (used_k, "seqused_k"), (leftpad, "cache_leftpad"),
                    (batch_idx, "cache_batch_idx")):
        _check_len(lst, B, nm)
    if paged and used_k is None:
        raise ValueError("a paged k/v cache (page_table) requires seqused_k")

    W = int(cp_world_size)
    r = int(cp_rank)
    if W < 1 or not (0 <= r < W):
        raise ValueError(f"invalid context parallel config cp_world_size={W}, cp_rank={r}")
    cp_tot = None
    if W > 1:
        if cp_tot_seqused_k is None:
            raise ValueError("cp_world_size > 1 requires cp_tot_seqused_k of shape (B,)")
        if cp_tot_seqused_k.dim() != 1 or cp_tot_seqused_k.shape[0] != B:
            raise ValueError(
                f"cp_tot_seqused_k must have shape ({B},) (global key length per sequence), "
                f"got {tuple(cp_tot_seqused_k.shape)}")
        cp_tot = _ints(cp_tot_seqused_k, "cp_tot_seqused_k")

    pt = None
    if paged:
        if page_table.dim() != 2:
            raise ValueError("page_table must be (B, max_pages)")
        pt = page_table.detach().cpu().to(torch.int64)
        num_pages, page_size = k.shape[0], k.shape[1]
        n_rows = pt.shape[0]
    elif not ragged_k:
        n_rows = k.shape[0]
    if not ragged_k and batch_idx is None and n_rows != B:
        raise ValueError(f"k/v cache has {n_rows} rows (or page_table rows) but batch is {B}")

    if learnable_sink is not None:
        if learnable_sink.numel() != H:
            raise ValueError(f"learnable_sink must have shape ({H},), got {tuple(learnable_sink.shape)}")
        sink = learnable_sink.detach().reshape(H).to(acc).cpu()
    else:
        sink = None

    def descale_of(t: Optional[Tensor], name: str) -> Optional[Tensor]:
        if t is None or not is_fp8:
            return None  # missing descale = 1; non-FP8 inputs ignore descales (FA3)
        return torch.broadcast_to(t.detach().cpu().to(acc), (B, Hk))

    qd, kd, vd = descale_of(q_descale, "q_descale"), descale_of(k_descale, "k_descale"), \
        descale_of(v_descale, "v_descale")

    def effective(x: Tensor, scale_row: Optional[Tensor]) -> Tensor:
        """x.float() * descale, in `acc`, then rounded to the matmul dtype."""
        x = x.detach().cpu().to(acc)
        if scale_row is not None:
            x = x * scale_row.view(1, -1, 1)
        return x.to(mm_dtype)

    # ------------------------------------------------------------------ outputs
    if ragged_q:
        Tq = q.shape[0]
        out = torch.zeros(Tq, H, Dv, dtype=acc)
        lse = torch.full((H, Tq), -math.inf, dtype=acc)
    else:
        Sq_max = q.shape[1]
        out = torch.zeros(B, Sq_max, H, Dv, dtype=acc)
        lse = torch.full((B, H, Sq_max), -math.inf, dtype=acc)

    # ------------------------------------------------------------------ per sequence
    for b in range(B):
        # ---- queries of sequence b
        if ragged_q:
            q_start, q_len = cuq[b], cuq[b + 1] - cuq[b]
        else:
            q_start, q_len = 0, q.shape[1]
        sq = q_len
        if used_q is not None:
            if not (0 <= used_q[b] <= q_len):
                raise ValueError(f"seqused_q[{b}]={used_q[b]} outside [0, {q_len}]")
            sq = used_q[b]
        q_src = q[q_start:q_start + sq] if ragged_q else q[b, :sq]
        qv_src = None
        if qv is not None:
            qv_src = qv[q_start:q_start + sq] if ragged_q else qv[b, :sq]

        # ---- keys of sequence b: cache positions t in [start, end)
        row = batch_idx[b] if batch_idx is not None else b
        if ragged_k:
            base = cuk[b]
            stored = cuk[b + 1] - cuk[b]
            if base < 0 or stored < 0:
                raise ValueError(f"invalid cu_seqlens_k {cuk}")
        else:
            if not (0 <= row < n_rows):
                raise ValueError(f"cache_batch_idx[{b}]={row} outside [0, {n_rows})")
            stored = pt.shape[1] * page_size if paged else k.shape[1]
        end = used_k[b] if used_k is not None else stored
        start = leftpad[b] if leftpad is not None else 0
        if not (0 <= start <= end):
            raise ValueError(f"sequence {b}: need 0 <= cache_leftpad ({start}) <= key end ({end})")
        if ragged_k:
            if base + end > k.shape[0]:
                raise ValueError(f"sequence {b}: keys [{base}, {base + end}) outside k with {k.shape[0]} rows")
        elif end > stored:
            raise ValueError(f"sequence {b}: seqused_k={end} exceeds the cache capacity {stored}")

        positions = list(range(start, end))
        if ragged_k:
            k_src = k[base + start:base + end]
            v_src = v[base + start:base + end]
        elif paged:
            pages, offs = [], []
            for t in positions:
                page = int(pt[row, t // page_size])
                if not (0 <= page < num_pages):
                    raise ValueError(f"page_table[{row}, {t // page_size}]={page} outside [0, {num_pages})")
                pages.append(page)
                offs.append(t % page_size)
            pages_t = torch.tensor(pages, dtype=torch.int64)
            offs_t = torch.tensor(offs, dtype=torch.int64)
            k_src = k.detach().cpu()[pages_t, offs_t]
            v_src = v.detach().cpu()[pages_t, offs_t]
        else:
            k_src = k[row, start:end]
            v_src = v[row, start:end]
        nk = len(positions)

        # masking columns: local column j = t - leftpad, global = j * W + rank
        local_cols = torch.arange(nk, dtype=torch.int64)
        if W > 1:
            cols = local_cols * W + r
            sk_mask = cp_tot[b]
        else:
            cols = local_cols
            sk_mask = end - start

        # ---- effective (dequantized) inputs in the matmul dtype
        q_row_scale = qd[b][kv_head_of] if qd is not None else None  # (H,)
        q_e = effective(q_src, q_row_scale)  # (sq, H, D)
        qv_e = effective(qv_src, q_row_scale) if qv_src is not None else None
        k_e = effective(k_src, kd[b] if kd is not None else None)  # (nk, Hk, D)
        v_e = effective(v_src, vd[b] if vd is not None else None)  # (nk, Hk, Dv)
        # GQA: give every query head its kv head
        k_h = k_e[:, kv_head_of]  # (nk, H, D)
        v_h = v_e[:, kv_head_of]  # (nk, H, Dv)

        # ---- scores (H, sq, nk)
        s = torch.einsum("qhd,khd->hqk", q_e, k_h).to(acc)
        if qv_e is not None:
            s = s + torch.einsum("qhd,khd->hqk", qv_e, v_h).to(acc)
        s = s * softmax_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)

        # ---- mask
        allowed = _allowed_mask(sq, sk_mask, cols, causal, window_size, attention_chunk)
        allowed = allowed.unsqueeze(0).expand(H, sq, nk)
        s_masked = torch.where(allowed, s, torch.full_like(s, -math.inf))

        # ---- softmax with optional sink; lse includes the sink
        if sink is not None:
            sink_col = sink.view(H, 1, 1).expand(H, sq, 1)
            lse_b = torch.logsumexp(torch.cat([s_masked, sink_col], dim=-1), dim=-1)  # (H, sq)
        else:
            lse_b = torch.logsumexp(s_masked, dim=-1) if nk > 0 else torch.full((H, sq), -math.inf, dtype=acc)
        row_ok = torch.isfinite(lse_b).unsqueeze(-1)  # rows with a finite normaliser
        safe_lse = torch.where(row_ok, lse_b.unsqueeze(-1), torch.zeros_like(lse_b).unsqueeze(-1))
        p = torch.where(allowed & row_ok, torch.exp(s - safe_lse), torch.zeros_like(s))
        if p_round is not None:
            p = p.to(p_round).to(acc)

        # ---- P @ V
        o = torch.einsum("hqk,khd->qhd", p.to(mm_dtype), v_h).to(acc)  # (sq, H, Dv)

        if ragged_q:
            out[q_start:q_start + sq] = o
            lse[:, q_start:q_start + sq] = lse_b
        else:
            out[b, :sq] = o
            lse[b, :, :sq] = lse_b

    return out.to(device=q.device, dtype=out_dtype), lse.to(device=q.device, dtype=torch.float32)


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Sequence[int], interleaved: bool = True) -> Tensor:
    """Rotary embedding of SEMANTICS §1 for rows of ``x`` ``(rows, H, D)``.

    Row r is rotated at ``positions[r]``: with ``R = 2 * cos.shape[1]``, channel pairs
    ``(2m, 2m+1)`` (``interleaved``, GPT-J) or ``(m, m + R/2)`` (NeoX) become
    ``(x1 cos - x2 sin, x1 sin + x2 cos)`` with ``cos = cos[p, m]``; channels ``>= R`` pass
    through. Computed in fp64 and rounded once to ``x.dtype``.
    """
    R = 2 * cos.shape[1]
    out = x.to(torch.float64).clone()
    for r, pos in enumerate(int(p) for p in positions):
        c = cos[pos].to(torch.float64)
        s_ = sin[pos].to(torch.float64)
        for m in range(R // 2):
            c1, c2 = (2 * m, 2 * m + 1) if interleaved else (m, m + R // 2)
            x1, x2 = out[r, :, c1].clone(), out[r, :, c2].clone()
            out[r, :, c1] = x1 * c[m] - x2 * s_[m]
            out[r, :, c2] = x1 * s_[m] + x2 * c[m]
    return out.to(x.dtype)


def kvcache_append_ref(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Sequence[int],
    *,
    cu_seqlens_k_new: Optional[Tensor] = None,
    page_table: Optional[Tensor] = None,
    cache_batch_idx: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_seqlens: Optional[Sequence[int]] = None,
    rotary_interleaved: bool = True,
) -> Tuple[Tensor, Tensor]:
    """The caches after ``kvcache_append`` (SEMANTICS §1, "Append and rotary"), as new tensors.

    New key t of sequence b (``k[b, t]``, or packed row ``cu_seqlens_k_new[b] + t``) goes to
    position ``cache_seqlens[b] + t`` of cache row ``cache_batch_idx[b]`` (or b): directly in a
    dense cache, or at ``[page_table[row, pos // P], pos % P]`` in a paged one. Keys are rotated
    (see :func:`rotary_ref`) at ``rotary_seqlens[b] + t`` (default ``cache_seqlens[b] + t``).
    Nothing else changes.
    """
    kc, vc = k_cache.clone(), v_cache.clone()
    lens = [int(x) for x in cache_seqlens]
    B = len(lens)
    offs = [int(x) for x in rotary_seqlens] if rotary_seqlens is not None else lens
    for b in range(B):
        if cu_seqlens_k_new is not None:
            rows = range(int(cu_seqlens_k_new[b]), int(cu_seqlens_k_new[b + 1]))
            kb, vb = k[list(rows)], v[list(rows)]
        else:
            kb, vb = k[b], v[b]
        if rotary_cos is not None and kb.shape[0] > 0:
            kb = rotary_ref(kb, rotary_cos, rotary_sin, [offs[b] + t for t in range(kb.shape[0])], rotary_interleaved)
        row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        for t in range(kb.shape[0]):
            pos = lens[b] + t
            if page_table is not None:
                P = kc.shape[1]
                page = int(page_table[row, pos // P])
                kc[page, pos % P], vc[page, pos % P] = kb[t], vb[t]
            else:
                kc[row, pos], vc[row, pos] = kb[t], vb[t]
    return kc, vc


def combine_ref(
    out_partial: Tensor,
    lse_partial: Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference flash_attn_combine (SEMANTICS.md section 2).

    ``out_partial`` is ``(S, B, Sq, H, Dv)`` or ``(S, Tq, H, Dv)``, ``lse_partial``
    ``(S, B, Sq, H)`` or ``(S, Tq, H)`` (natural log).  Computes, in float64,
    ``lse = logsumexp_s lse_partial[s]`` and
    ``out = sum_s exp(lse_partial[s] - lse) * out_partial[s]``.  A split whose lse
    is -inf or NaN gets weight 0, is excluded from the total lse, and its partial
    output (possibly garbage) contributes exactly 0.  If every split is
    -inf/NaN: out 0, lse -inf.

    Returns ``(out, lse)``: out without the split dim in ``out_dtype`` (default
    ``out_partial.dtype``), lse float32 shaped like ``lse_partial`` without the
    split dim.
    """
    if out_partial.dim() < 2 or lse_partial.shape != out_partial.shape[:-1]:
        raise ValueError(
            f"lse_partial {tuple(lse_partial.shape)} must be out_partial {tuple(out_partial.shape)} "
            "without its last dim")
    if out_dtype is None:
        out_dtype = out_partial.dtype
    o = out_partial.detach().to(torch.float64)
    l = lse_partial.detach().to(torch.float64)
    live = ~(torch.isnan(l) | (l == -math.inf))  # splits that contribute
    l_live = torch.where(live, l, torch.full_like(l, -math.inf))
    lse = torch.logsumexp(l_live, dim=0)  # -inf where no split is live
    lse_ok = torch.isfinite(lse)
    safe_lse = torch.where(lse_ok, lse, torch.zeros_like(lse))
    w = torch.where(live & lse_ok.unsqueeze(0), torch.exp(l_live - safe_lse.unsqueeze(0)), torch.zeros_like(l))
    contrib = torch.where((w > 0).unsqueeze(-1), w.unsqueeze(-1) * o, torch.zeros_like(o))
    out = contrib.sum(dim=0)
    return out.to(out_dtype), lse.to(torch.float32)


def assert_close_fa3(
    out: Tensor,
    out_ref: Tensor,
    out_lowp: Tensor,
    *,
    atol: Optional[float] = None,
    name: str = "out",
    input_dtype: Optional[torch.dtype] = None,
) -> None:
    """FlashAttention-3's tolerance rule.

    Passes iff ``max|out - out_ref| <= 2 * max|out_lowp - out_ref| + atol`` where
    ``out_ref`` is the fp64 oracle and ``out_lowp`` the oracle run in the input
    precision (``fmha_ref(..., compute_dtype=<input dtype>)``).

    ``atol`` defaults to ``DEFAULT_ATOL[input_dtype or out.dtype]``: 1e-5 for
    float32 (and float64), 2e-3 for float16/bfloat16, 5e-2 for fp8-derived
    outputs (pass ``input_dtype=torch.float8_e4m3fn``, since FP8 inputs give
    bf16 outputs).

    Positions where ``out_ref`` and ``out`` are the same infinity (e.g. lse -inf
    of an empty row) are ignored; any NaN in ``out`` fails.  Raises
    ``AssertionError`` naming the max error, the allowed bound and the index of
    the worst element.
    """
    if out.shape != out_ref.shape or out_lowp.shape != out_ref.shape:
        raise AssertionError(
            f"{name}: shape mismatch: out {tuple(out.shape)}, out_ref {tuple(out_ref.shape)}, "
            f"out_lowp {tuple(out_lowp.shape)}")
    if atol is None:
        key = input_dtype if input_dtype is not None else out.dtype
        if key not in DEFAULT_ATOL:
            raise ValueError(f"no default atol for dtype {key}; pass atol=")
        atol = DEFAULT_ATOL[key]
    o = out.detach().cpu().to(torch.float64)
    ref = out_ref.detach().cpu().to(torch.float64)
    low = out_lowp.detach().cpu().to(torch.float64)

    nan_pos = torch.isnan(o)
    if nan_pos.any():
        idx = tuple(int(x) for x in nan_pos.nonzero()[0].tolist())
        raise AssertionError(f"{name}: NaN in output ({int(nan_pos.sum())} elements), first at index {idx}")

    same_inf = torch.isinf(ref) & (o == ref)
    compare = ~same_inf
    if not compare.any():
        return

    err = torch.where(compare, (o - ref).abs(), torch.zeros_like(o))
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    max_err = float(err.max())
    if math.isinf(max_err):
        flat = int(torch.argmax(err.reshape(-1)))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: max abs error inf; worst at index {idx}: out={o[idx].item()!r}, "
            f"ref={ref[idx].item()!r}")
    low_err = torch.where(compare, (low - ref).abs(), torch.zeros_like(low))
    if torch.isnan(low_err).any() or torch.isinf(low_err).any():
        bad = ~torch.isfinite(low_err)
        idx = tuple(int(x) for x in bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: the low-precision reference differs non-finitely from out_ref at {idx} "
            f"(out_lowp={low[idx].item()}, out_ref={ref[idx].item()}); cannot derive a bound")
    bound = 2.0 * float(low_err.max()) + float(atol)
    if not max_err <= bound:
        flat = int(torch.argmax(err.reshape(-1)))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: max abs error {max_err:.6g} > allowed {bound:.6g} "
            f"(= 2 * lowp error {float(low_err.max()):.6g} + atol {atol:.3g}); "
            f"worst at index {idx}: out={o[idx].item()!r}, ref={ref[idx].item()!r}, "
            f"lowp={low[idx].item()!r}")


def poison_(t: Tensor) -> Tensor:
    """Fill ``t`` in place with garbage and return it.

    Floating (fp16/bf16/fp32/fp64, complex) tensors get NaN; FP8 tensors get the
    large value 448 (e4m3 max; 57344 for e5m2); integer tensors get the dtype's
    maximum value; bool tensors get True.  Use it on output buffers and on
    memory a kernel must not read.
    """
    with torch.no_grad():
        if _is_fp8(t.dtype):
            big = 57344.0 if "e5m2" in str(t.dtype) else 448.0
            tmp = torch.full(t.shape, big, dtype=torch.float32, device=t.device)
            t.copy_(tmp.to(t.dtype))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        else:
            t.fill_(torch.iinfo(t.dtype).max)
    return t


def random_seqlens(
    batch: int,
    max_len: int,
    min_len: int = 0,
    generator: Optional[torch.Generator] = None,
) -> list:
    """Return a list of ``batch`` random lengths, each in ``[min_len, max_len]``."""
    return [int(x) for x in torch.randint(min_len, max_len + 1, (batch,), generator=generator).tolist()]


def random_cu_seqlens(lengths: Union[Sequence[int], Tensor]) -> Tensor:
    """Cumulative sequence offsets ``[0, l0, l0+l1, ...]`` as an int32 ``(B+1,)`` tensor.

    ``lengths`` is a list/tuple/tensor of per-sequence lengths (e.g. from
    :func:`random_seqlens`).
    """
    lens = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if any(x < 0 for x in lens):
        raise ValueError(f"lengths must be >= 0, got {lens}")
    cu = [0]
    for x in lens:
        cu.append(cu[-1] + x)
    return torch.tensor(cu, dtype=torch.int32)


def make_paged_kv(
    k_dense: Tensor,
    v_dense: Tensor,
    seqlens: Union[Sequence[int], Tensor],
    page_size: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scatter dense per-sequence k/v into a randomly permuted page pool.

    ``k_dense (B, Sk, Hk, D)``, ``v_dense (B, Sk, Hk, Dv)``; tokens
    ``[0, seqlens[b])`` of sequence b are stored (so ``seqused_k = seqlens``).
    Returns ``(k_pages (num_pages, page_size, Hk, D), v_pages (num_pages,
    page_size, Hk, Dv), page_table int32 (B, max_pages))``.

    Every slot not holding a real token is poisoned (NaN; see :func:`poison_`).
    The pool holds the pages the sequences need plus one extra poisoned page,
    placed at a random position; page-table entries past a sequence's last page
    point at that poisoned page (valid index, garbage content), so a kernel
    that reads past ``seqused_k`` sees NaN instead of crashing.
    """
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    B, Sk = k_dense.shape[0], k_dense.shape[1]
    lens = [int(x) for x in (seqlens.tolist() if isinstance(seqlens, torch.Tensor) else seqlens)]
    if len(lens) != B or any(not (0 <= x <= Sk) for x in lens):
        raise ValueError(f"seqlens {lens} must have {B} entries in [0, {Sk}]")
    n_needed = [(x + page_size - 1) // page_size for x in lens]
    max_pages = max([1] + n_needed)
    num_pages = sum(n_needed) + 1
    perm = torch.randperm(num_pages, generator=generator).tolist()
    spare = perm[-1]

    k_pages = poison_(torch.empty((num_pages, page_size) + tuple(k_dense.shape[2:]),
                                  dtype=k_dense.dtype, device=k_dense.device))
    v_pages = poison_(torch.empty((num_pages, page_size) + tuple(v_dense.shape[2:]),
                                  dtype=v_dense.dtype, device=v_dense.device))
    page_table = torch.full((B, max_pages), spare, dtype=torch.int32)
    nxt = 0
    for b in range(B):
        for p in range(n_needed[b]):
            page = perm[nxt]
            nxt += 1
            page_table[b, p] = page
            t0, t1 = p * page_size, min((p + 1) * page_size, lens[b])
            k_pages[page, : t1 - t0] = k_dense[b, t0:t1]
            v_pages[page, : t1 - t0] = v_dense[b, t0:t1]
    return k_pages, v_pages, page_table.to(k_dense.device)
