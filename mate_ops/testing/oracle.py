"""The oracle: a pure-PyTorch reference of docs/semantics.md sections 1 to 4.

Deliberately slow and simple: per-sequence Python loops, explicit boolean masks, fp64 (or a
chosen low precision) math, no fused kernels and no use of the compiled extension or of
``torch.ops.mate``, so it can test any backend (CPU reference, device kernels, fake kernels).

- :func:`fmha_ref`        -- FMHA forward (flash_attn_func / varlen / with_kvcache
                             attention part, without append/rotary).
- :func:`rotary_ref`, :func:`kvcache_append_ref` -- the append + rotary step of
                             flash_attn_with_kvcache.
- :func:`combine_ref`     -- flash_attn_combine.
- :func:`mla_decode_ref`  -- flash_mla_with_kvcache (dense, sparse, FP8 caches; section 3).
- :func:`mla_sparse_prefill_ref` -- flash_mla_sparse_fwd (section 3).
- :func:`mla_paged_ref`   -- FlashInfer BatchMLAPagedAttentionWrapper (section 4).

FP8 MLA caches are read with :mod:`mate_ops.mla_fp8`, the production format module, instead
of a second copy of the byte decoder kept here. Why that keeps the oracle honest:

- ``mla_fp8`` is pure PyTorch (no extension, no ``torch.ops.mate``), so the oracle still
  never runs C++ code (tests/test_oracle*.py load it even when the extension is not built);
- the C++ kernels decode the bytes with their own code, so a kernel that disagreed with
  the documented layout still disagrees with the oracle;
- a second Python decoder would only check the Python format module against itself; the
  layout is pinned instead byte by byte, by hand with ``struct``, in tests/test_oracle_mla.py.

Decisions on points docs/semantics.md leaves open (each one follows FlashAttention-3
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

The MLA decisions are listed in the comment block above :func:`mla_decode_ref`'s helpers.
"""
import math
from typing import Optional, Sequence, Tuple

import torch

from ..mla_fp8 import MODEL1_BYTES_PER_TOKEN as _MODEL1_BYTES
from ..mla_fp8 import V32_BYTES_PER_TOKEN as _V32_BYTES
from ..mla_fp8 import dequantize_mla_model1, dequantize_mla_v32
from ._dtypes import _is_fp8

Tensor = torch.Tensor

__all__ = [
    "fmha_ref",
    "combine_ref",
    "rotary_ref",
    "kvcache_append_ref",
    "mla_decode_ref",
    "mla_sparse_prefill_ref",
    "mla_paged_ref",
]


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
    alibi_slopes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference FMHA forward exactly as docs/semantics.md section 1 specifies.

    ``alibi_slopes`` fp32 ``(H,)`` or ``(B, H)``: FlashAttention-2's ALiBi, the bias
    ``-slope_h * |i + Sk - Sq - j|`` (bottom-right aligned, global columns) added to the
    scaled, soft-capped score.

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
        sink = learnable_sink.reshape(H).to(acc).cpu()  # not detached: autograd through the oracle
    else:
        sink = None

    def descale_of(t: Optional[Tensor], name: str) -> Optional[Tensor]:
        if t is None or not is_fp8:
            return None  # missing descale = 1; non-FP8 inputs ignore descales (FA3)
        return torch.broadcast_to(t.detach().cpu().to(acc), (B, Hk))

    qd, kd, vd = descale_of(q_descale, "q_descale"), descale_of(k_descale, "k_descale"), \
        descale_of(v_descale, "v_descale")

    def effective(x: Tensor, scale_row: Optional[Tensor]) -> Tensor:
        """x.float() * descale, in `acc`, then rounded to the matmul dtype (differentiable:
        autograd through the oracle gives the reference gradients of the backward)."""
        x = x.cpu().to(acc)
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
        if alibi_slopes is not None:  # FA2's ALiBi: -slope * |i + Sk - Sq - j| on the scaled score
            slopes = alibi_slopes.detach().cpu().to(torch.float64)
            slopes = slopes[b] if slopes.dim() == 2 else slopes  # (H,)
            a = torch.arange(sq, dtype=torch.int64).unsqueeze(1) + sk_mask - sq  # (sq, 1)
            dist = (a - cols.unsqueeze(0)).abs().to(torch.float64)  # (sq, nk)
            s = s - (slopes.view(H, 1, 1) * dist.unsqueeze(0)).to(s.dtype)

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
    """Reference flash_attn_combine (docs/semantics.md section 2).

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


# =====================================================================================
# MLA (docs/semantics.md sections 3 and 4)
# =====================================================================================
#
# Decisions on points docs/semantics.md sections 3/4 leave open (following FlashMLA's
# tests/ref.py, tests/quant.py and flash_mla_interface.py, or FlashInfer):
#
# - Sparse indices: every negative value (not only -1) and every value >= the number of
#   slots is invalid and ignored (FlashMLA's sparse-prefill reference uses ``< 0``).
#   Duplicate valid indices are attended once per occurrence (they are gathered twice).
# - ``topk_length`` / ``extra_topk_length`` values outside ``[0, topk]`` raise ValueError
#   (a kernel would read past the index row; the oracle never clamps).
# - ``causal=True`` together with ``indices`` raises ValueError (FlashMLA asserts it).
#   Unlike FlashMLA, the oracle allows ``attn_sink`` in dense mode and non-fp8 caches in
#   sparse mode; the sink rule is the same everywhere.
# - ``extra_k_cache`` may have its own page size and number of blocks; its slots are
#   ``block * P_extra + offset``. It uses the same format (bf16 or fp8) as ``k_cache``.
# - The MLA sink factor ``exp(lse) / (exp(lse) + exp(sink))`` is evaluated as
#   ``1 / (1 + exp(sink - lse))``: sink +inf -> 0, sink -inf -> 1, rows without keys stay
#   0 whatever the sink (and keep lse +inf).
# - The FP8 cache layouts and the quantizers' decisions: see mate_ops/mla_fp8.py.
# - FlashInfer reference: rows with no key give out 0 and lse -inf (FlashInfer's
#   convention, unlike FlashMLA's +inf); query rows past ``qo_indptr[-1]`` likewise.


def _mla_precision(compute_dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype, Optional[torch.dtype]]:
    """(accumulate dtype, matmul dtype, probability rounding dtype) -- same modes as fmha_ref."""
    if compute_dtype == torch.float64:
        return torch.float64, torch.float64, None
    if compute_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32, compute_dtype, None
    if _is_fp8(compute_dtype):
        return torch.float32, torch.bfloat16, compute_dtype
    raise ValueError(f"unsupported compute_dtype {compute_dtype}")


def _mla_attend(
    q_rows: Tensor,
    keys: Tensor,
    allowed: Optional[Tensor],
    scale: float,
    dv: int,
    prec: Tuple[torch.dtype, torch.dtype, Optional[torch.dtype]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Softmax attention of ``n`` query rows over one shared key list.

    ``q_rows (n, H, D)``; ``keys (nk, Hk, D)`` (already dequantized; V = ``keys[..., :dv]``);
    ``allowed (n, nk)`` bool or None (all allowed). GQA: head h uses kv head ``h // (H // Hk)``.
    Returns ``out (n, H, dv)``, ``lse (n, H)`` and ``max_logit (n, H)`` in the accumulate
    dtype, with out 0 and lse/max_logit -inf for rows that have no allowed key. No sink.
    """
    acc, mm, p_round = prec
    n, H, D = q_rows.shape
    nk, Hk = keys.shape[0], keys.shape[1]
    G = H // Hk
    if nk == 0:
        return (torch.zeros(n, H, dv, dtype=acc), torch.full((n, H), -math.inf, dtype=acc),
                torch.full((n, H), -math.inf, dtype=acc))
    q_e = q_rows.detach().cpu().to(acc).to(mm).reshape(n, Hk, G, D)
    k_e = keys.detach().cpu().to(acc).to(mm)  # (nk, Hk, D)
    v_e = k_e[..., :dv]
    s = torch.einsum("ikgd,jkd->kgij", q_e, k_e).to(acc).reshape(H, n, nk) * scale
    if allowed is None:
        allowed = torch.ones(n, nk, dtype=torch.bool)
    allowed = allowed.unsqueeze(0).expand(H, n, nk)
    s_m = torch.where(allowed, s, torch.full_like(s, -math.inf))
    lse = torch.logsumexp(s_m, dim=-1)  # (H, n), -inf for rows without a key
    mx = s_m.amax(dim=-1)
    ok = torch.isfinite(lse).unsqueeze(-1)
    safe = torch.where(ok, lse.unsqueeze(-1), torch.zeros_like(lse).unsqueeze(-1))
    p = torch.where(allowed & ok, torch.exp(s - safe), torch.zeros_like(s))
    if p_round is not None:
        p = p.to(p_round).to(acc)
    o = torch.einsum("kgij,jkd->ikgd", p.to(mm).reshape(Hk, G, n, nk), v_e).to(acc).reshape(n, H, dv)
    return o, lse.transpose(0, 1), mx.transpose(0, 1)


def _mla_sink_factor(lse: Tensor, sink: Optional[Tensor]) -> Optional[Tensor]:
    """``exp(lse) / (exp(lse) + exp(sink))`` per (row, head); lse (n, H), sink (H,). 0 where lse = -inf."""
    if sink is None:
        return None
    sink = sink.view(1, -1).expand_as(lse)
    f = 1.0 / (1.0 + torch.exp(sink - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))))
    f = torch.where(sink == math.inf, torch.zeros_like(f), f)
    f = torch.where(sink == -math.inf, torch.ones_like(f), f)
    return torch.where(lse == -math.inf, torch.zeros_like(f), f)


def _mla_cache_keys(cache: Tensor, is_fp8: bool, dqk: int, name: str) -> Tensor:
    """A (possibly fp8) MLA cache as float (num_blocks, P, Hkv, Dqk) on the CPU."""
    if cache.dim() != 4:
        raise ValueError(f"{name} must be (num_blocks, P, Hkv, D), got shape {tuple(cache.shape)}")
    if not is_fp8:
        if cache.element_size() == 1 or not cache.is_floating_point():
            raise ValueError(f"{name} has dtype {cache.dtype}: pass is_fp8_kvcache=True for fp8 caches")
        if cache.shape[3] != dqk:
            raise ValueError(f"{name} head dim {cache.shape[3]} != q head dim {dqk}")
        return cache.detach().cpu()
    if cache.shape[2] != 1:
        raise ValueError(f"fp8 {name} must have 1 kv head, got {cache.shape[2]}")
    if cache.shape[3] == _V32_BYTES and dqk == 576:
        return dequantize_mla_v32(cache).cpu()
    if cache.shape[3] == _MODEL1_BYTES and dqk == 512:
        return dequantize_mla_model1(cache).cpu()
    raise ValueError(
        f"fp8 {name} must be V3.2 (last dim 656, q head dim 576) or MODEL1 (last dim 584, q head "
        f"dim 512); got last dim {cache.shape[3]} with q head dim {dqk}")


def _sparse_slots(idx_row: list, n_valid: int, num_slots: int) -> list:
    """The valid slots among the first ``n_valid`` entries of an index row (duplicates kept)."""
    return [s for s in idx_row[:n_valid] if 0 <= s < num_slots]


def _topk_lengths(t: Optional[Tensor], n: int, topk: int, name: str) -> list:
    if t is None:
        return [topk] * n
    lens = _ints(t, name)
    _check_len(lens, n, name)
    for i, x in enumerate(lens):
        if not (0 <= x <= topk):
            raise ValueError(f"{name}[{i}]={x} outside [0, {topk}]")
    return lens


def mla_decode_ref(
    q: Tensor,
    k_cache: Tensor,
    block_table: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    head_dim_v: int,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[Tensor] = None,
    attn_sink: Optional[Tensor] = None,
    extra_k_cache: Optional[Tensor] = None,
    extra_indices_in_kvcache: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    extra_topk_length: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor]:
    """Reference ``flash_mla_with_kvcache`` (docs/semantics.md section 3), returns ``(out, lse)``.

    ``q (B, Sq, Hq, Dqk)``; ``k_cache (num_blocks, P, Hkv, Dqk)`` in a float dtype, or with
    ``is_fp8_kvcache=True`` an FP8 cache of a 1-byte dtype: ``(.., 1, 656)`` (V3.2, Dqk 576,
    see :func:`quantize_mla_v32`) or ``(.., 1, 584)`` (MODEL1, Dqk 512, see
    :func:`quantize_mla_model1`), dequantized before use. V is the first ``head_dim_v``
    channels of (dequantized) K. Scores ``s = scale * <q, k>``, default scale ``1/sqrt(Dqk)``.

    * Dense (``indices`` None): sequence b's keys are tokens ``[0, cache_seqlens[b])``,
      token t at ``k_cache[block_table[b, t // P], t % P]``; ``causal`` is bottom-right
      aligned (row i sees key j iff ``j <= i + Sk - Sq``); GQA head h reads kv head
      ``h // (Hq // Hkv)``.
    * Sparse (``indices (B, Sq, topk)`` given; ``block_table``/``cache_seqlens`` unused,
      ``Hkv`` must be 1, ``causal`` must be False): row (b, i) attends to the slots
      ``indices[b, i, :topk_length[b]]`` (slot = ``block * P + offset``); negative slots and
      slots ``>= num_blocks * P`` are ignored, duplicates count once per occurrence.
      ``extra_k_cache`` + ``extra_indices_in_kvcache`` (+ ``extra_topk_length``) add the
      keys of a second cache (same format, own page size) to the same softmax.

    ``attn_sink (Hq,)``: the output is multiplied by ``exp(lse) / (exp(lse) + exp(sink))``;
    the returned lse excludes the sink (sink +inf -> out 0; -inf -> no change).
    A row with no key gives out 0 and lse **+inf** (FlashMLA's convention).

    Returns out ``(B, Sq, Hq, head_dim_v)`` in ``q.dtype`` and lse float32 ``(B, Hq, Sq)``
    (natural log). ``compute_dtype`` has :func:`fmha_ref`'s meaning (fp64 oracle, or the
    low-precision reference for :func:`assert_close_fa3`).
    """
    prec = _mla_precision(compute_dtype)
    acc = prec[0]
    if q.dim() != 4:
        raise ValueError(f"q must be (B, Sq, Hq, Dqk), got shape {tuple(q.shape)}")
    B, Sq, Hq, Dqk = q.shape
    dv = int(head_dim_v)
    if not (0 < dv <= Dqk):
        raise ValueError(f"head_dim_v={dv} must be in [1, {Dqk}]")
    keys_all = _mla_cache_keys(k_cache, is_fp8_kvcache, Dqk, "k_cache")  # (nb, P, Hkv, Dqk)
    nb, P, Hkv = keys_all.shape[0], keys_all.shape[1], keys_all.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of the kv heads {Hkv}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(Dqk)
    sink = None
    if attn_sink is not None:
        if attn_sink.numel() != Hq:
            raise ValueError(f"attn_sink must have shape ({Hq},), got {tuple(attn_sink.shape)}")
        sink = attn_sink.detach().cpu().reshape(Hq).to(acc)

    out = torch.zeros(B, Sq, Hq, dv, dtype=acc)
    lse = torch.full((B, Hq, Sq), math.inf, dtype=acc)

    def finish(b: int, rows: slice, o: Tensor, l: Tensor) -> None:
        """Apply the sink and the no-key convention, store rows of sequence b."""
        f = _mla_sink_factor(l, sink)
        if f is not None:
            o = o * f.unsqueeze(-1)
        o = torch.where((l == -math.inf).unsqueeze(-1), torch.zeros_like(o), o)
        l = torch.where(l == -math.inf, torch.full_like(l, math.inf), l)
        out[b, rows] = o
        lse[b, :, rows] = l.transpose(0, 1)

    if indices is None:
        # ------------------------------------------------------------ dense
        for nm, t in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                      ("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
            if t is not None:
                raise ValueError(f"{nm} needs sparse attention (indices)")
        if block_table is None or cache_seqlens is None:
            raise ValueError("dense MLA decode needs block_table and cache_seqlens")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be ({B}, max_blocks), got {tuple(block_table.shape)}")
        bt = block_table.detach().cpu().to(torch.int64)
        lens = _ints(cache_seqlens, "cache_seqlens")
        _check_len(lens, B, "cache_seqlens")
        for b in range(B):
            sk = lens[b]
            if not (0 <= sk <= bt.shape[1] * P):
                raise ValueError(f"cache_seqlens[{b}]={sk} outside [0, {bt.shape[1] * P}]")
            blocks = [int(bt[b, t // P]) for t in range(sk)]
            for t, blk in enumerate(blocks):
                if not (0 <= blk < nb):
                    raise ValueError(f"block_table[{b}, {t // P}]={blk} outside [0, {nb})")
            if sk > 0:
                keys = keys_all[torch.tensor(blocks), torch.tensor([t % P for t in range(sk)])]
            else:
                keys = keys_all.new_zeros((0, Hkv, Dqk))
            allowed = _allowed_mask(Sq, sk, torch.arange(sk), causal, (-1, -1), 0)
            o, l, _ = _mla_attend(q[b], keys, allowed, scale, dv, prec)
            finish(b, slice(0, Sq), o, l)
    else:
        # ------------------------------------------------------------ sparse
        if causal:
            raise ValueError("causal must be False when indices are given (sparse attention)")
        if Hkv != 1:
            raise ValueError(f"sparse MLA needs 1 kv head, k_cache has {Hkv}")
        if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, Sq):
            raise ValueError(f"indices must be ({B}, {Sq}, topk), got {tuple(indices.shape)}")
        if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
            raise ValueError("extra_k_cache and extra_indices_in_kvcache must be given together")
        if extra_topk_length is not None and extra_k_cache is None:
            raise ValueError("extra_topk_length needs extra_k_cache")
        flat = keys_all.reshape(nb * P, 1, Dqk)
        idx = _ints(indices, "indices")
        topk = indices.shape[2]
        tl = _topk_lengths(topk_length, B, topk, "topk_length")
        flat_x, idx_x, etopk, etl = None, None, 0, None
        if extra_k_cache is not None:
            kx = _mla_cache_keys(extra_k_cache, is_fp8_kvcache, Dqk, "extra_k_cache")
            if kx.shape[2] != 1:
                raise ValueError(f"extra_k_cache must have 1 kv head, got {kx.shape[2]}")
            flat_x = kx.reshape(kx.shape[0] * kx.shape[1], 1, Dqk)
            ei = extra_indices_in_kvcache
            if ei.dim() != 3 or tuple(ei.shape[:2]) != (B, Sq):
                raise ValueError(f"extra_indices_in_kvcache must be ({B}, {Sq}, extra_topk), got {tuple(ei.shape)}")
            idx_x = _ints(ei, "extra_indices_in_kvcache")
            etopk = ei.shape[2]
            etl = _topk_lengths(extra_topk_length, B, etopk, "extra_topk_length")
        for b in range(B):
            for i in range(Sq):
                r0 = (b * Sq + i) * topk
                slots = _sparse_slots(idx[r0:r0 + topk], tl[b], flat.shape[0])
                keys = flat[torch.tensor(slots, dtype=torch.int64)]
                if flat_x is not None:
                    r1 = (b * Sq + i) * etopk
                    slots_x = _sparse_slots(idx_x[r1:r1 + etopk], etl[b], flat_x.shape[0])
                    keys = torch.cat([keys.to(acc), flat_x[torch.tensor(slots_x, dtype=torch.int64)].to(acc)])
                o, l, _ = _mla_attend(q[b, i:i + 1], keys, None, scale, dv, prec)
                finish(b, slice(i, i + 1), o, l)

    return out.to(device=q.device, dtype=q.dtype), lse.to(device=q.device, dtype=torch.float32)


def mla_sparse_prefill_ref(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference ``flash_mla_sparse_fwd`` (docs/semantics.md section 3, "Sparse prefill").

    ``q (Sq, Hq, Dqk)``, ``kv (Skv, 1, Dqk)``, ``indices (Sq, 1, topk)`` (rows of kv; any
    negative value or value ``>= Skv`` is ignored, duplicates count once per occurrence),
    ``topk_length (Sq,)``: row i only uses ``indices[i, 0, :topk_length[i]]``.
    Scores ``sm_scale * <q, k>``, V = ``kv[..., :d_v]``.

    Returns ``(out (Sq, Hq, d_v) in q.dtype, max_logits (Sq, Hq) fp32, lse (Sq, Hq) fp32)``:
    max_logits is the largest scaled score over the valid keys (-inf when there is none);
    lse is the natural-log logsumexp of the scaled scores, +inf when there is no valid key,
    and excludes the sink. ``attn_sink (Hq,)`` multiplies out by
    ``exp(lse) / (exp(lse) + exp(sink))`` (+inf -> 0, -inf -> unchanged). Rows without a
    key give out 0. ``compute_dtype`` as in :func:`fmha_ref`.
    """
    prec = _mla_precision(compute_dtype)
    acc = prec[0]
    if q.dim() != 3 or kv.dim() != 3:
        raise ValueError(f"q must be (Sq, Hq, Dqk) and kv (Skv, 1, Dqk); got {tuple(q.shape)}, {tuple(kv.shape)}")
    Sq, Hq, Dqk = q.shape
    Skv = kv.shape[0]
    if kv.shape[1] != 1 or kv.shape[2] != Dqk:
        raise ValueError(f"kv must be ({Skv}, 1, {Dqk}), got {tuple(kv.shape)}")
    if indices.dim() != 3 or indices.shape[0] != Sq or indices.shape[1] != 1:
        raise ValueError(f"indices must be ({Sq}, 1, topk), got {tuple(indices.shape)}")
    dv = int(d_v)
    if not (0 < dv <= Dqk):
        raise ValueError(f"d_v={dv} must be in [1, {Dqk}]")
    topk = indices.shape[2]
    idx = _ints(indices, "indices")
    tl = _topk_lengths(topk_length, Sq, topk, "topk_length")
    sink = None
    if attn_sink is not None:
        if attn_sink.numel() != Hq:
            raise ValueError(f"attn_sink must have shape ({Hq},), got {tuple(attn_sink.shape)}")
        sink = attn_sink.detach().cpu().reshape(Hq).to(acc)
    kv_c = kv.detach().cpu()
    out = torch.zeros(Sq, Hq, dv, dtype=acc)
    max_logits = torch.full((Sq, Hq), -math.inf, dtype=acc)
    lse = torch.full((Sq, Hq), math.inf, dtype=acc)
    for i in range(Sq):
        slots = _sparse_slots(idx[i * topk:(i + 1) * topk], tl[i], Skv)
        keys = kv_c[torch.tensor(slots, dtype=torch.int64)]
        o, l, m = _mla_attend(q[i:i + 1], keys, None, float(sm_scale), dv, prec)
        f = _mla_sink_factor(l, sink)
        if f is not None:
            o = o * f.unsqueeze(-1)
        empty = l == -math.inf
        out[i] = torch.where(empty.unsqueeze(-1), torch.zeros_like(o), o)[0]
        lse[i] = torch.where(empty, torch.full_like(l, math.inf), l)[0]
        max_logits[i] = m[0]
    return (out.to(device=q.device, dtype=q.dtype), max_logits.to(device=q.device, dtype=torch.float32),
            lse.to(device=q.device, dtype=torch.float32))


def mla_paged_ref(
    q_nope: Tensor,
    q_pe: Tensor,
    ckv_cache: Tensor,
    kpe_cache: Tensor,
    qo_indptr: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    kv_len_arr: Tensor,
    sm_scale: float,
    causal: bool,
    return_lse_base2: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor]:
    """Reference FlashInfer ``BatchMLAPagedAttentionWrapper`` plan+run (docs/semantics.md section 4).

    ``q_nope (Tq, H, Dc)``, ``q_pe (Tq, H, Dp)`` (512 / 64), ``ckv_cache (pages, P, Dc)``,
    ``kpe_cache (pages, P, Dp)``. Sequence b owns query rows ``qo_indptr[b]:qo_indptr[b+1]``,
    the pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and ``kv_len_arr[b]`` keys (key t on
    page ``kv_indices[kv_indptr[b] + t // P]``, slot ``t % P``). Score
    ``sm_scale * (<q_nope, ckv> + <q_pe, kpe>)``, value ``ckv``; ``causal`` is bottom-right
    aligned. Every head shares the single latent kv head.

    Returns ``out (Tq, H, Dc)`` in ``q_nope.dtype`` and ``lse (Tq, H)`` float32, base 2 by
    default (``lse_natural / ln 2``), natural log with ``return_lse_base2=False``.
    Rows with no key (and rows past ``qo_indptr[-1]``) give out 0 and lse **-inf**
    (FlashInfer's convention; FlashMLA uses +inf). ``compute_dtype`` as in :func:`fmha_ref`.
    """
    prec = _mla_precision(compute_dtype)
    acc = prec[0]
    if q_nope.dim() != 3 or q_pe.dim() != 3 or q_nope.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_nope (Tq, H, Dc) and q_pe (Tq, H, Dp) disagree: "
                         f"{tuple(q_nope.shape)}, {tuple(q_pe.shape)}")
    Tq, H, Dc = q_nope.shape
    Dp = q_pe.shape[2]
    if ckv_cache.dim() != 3 or kpe_cache.dim() != 3 or ckv_cache.shape[:2] != kpe_cache.shape[:2] \
            or ckv_cache.shape[2] != Dc or kpe_cache.shape[2] != Dp:
        raise ValueError(f"ckv_cache must be (pages, P, {Dc}) and kpe_cache (pages, P, {Dp}); got "
                         f"{tuple(ckv_cache.shape)}, {tuple(kpe_cache.shape)}")
    num_pages, P = ckv_cache.shape[0], ckv_cache.shape[1]
    qo = _ints(qo_indptr, "qo_indptr")
    kvp = _ints(kv_indptr, "kv_indptr")
    kvi = _ints(kv_indices, "kv_indices")
    kvl = _ints(kv_len_arr, "kv_len_arr")
    B = len(qo) - 1
    _check_len(kvp, B + 1, "kv_indptr")
    _check_len(kvl, B, "kv_len_arr")
    if B < 0 or qo[0] != 0 or any(qo[b + 1] < qo[b] for b in range(B)) or qo[-1] > Tq:
        raise ValueError(f"invalid qo_indptr {qo} for {Tq} query rows")
    if kvp[0] != 0 or any(kvp[b + 1] < kvp[b] for b in range(B)) or kvp[-1] > len(kvi):
        raise ValueError(f"invalid kv_indptr {kvp} for {len(kvi)} kv_indices")
    # one latent kv head holding [ckv | kpe]; V = the first Dc channels
    q_all = torch.cat([q_nope.detach().cpu().to(acc), q_pe.detach().cpu().to(acc)], dim=-1)
    k_all = torch.cat([ckv_cache.detach().cpu().to(acc), kpe_cache.detach().cpu().to(acc)], dim=-1)
    out = torch.zeros(Tq, H, Dc, dtype=acc)
    lse = torch.full((Tq, H), -math.inf, dtype=acc)
    for b in range(B):
        pages = kvi[kvp[b]:kvp[b + 1]]
        sk, sq = kvl[b], qo[b + 1] - qo[b]
        if not (0 <= sk <= len(pages) * P):
            raise ValueError(f"kv_len_arr[{b}]={sk} outside [0, {len(pages) * P}] ({len(pages)} pages of {P})")
        for t in range(sk):
            if not (0 <= pages[t // P] < num_pages):
                raise ValueError(f"kv_indices[{kvp[b] + t // P}]={pages[t // P]} outside [0, {num_pages})")
        keys = k_all[torch.tensor([pages[t // P] for t in range(sk)], dtype=torch.int64),
                     torch.tensor([t % P for t in range(sk)], dtype=torch.int64)].unsqueeze(1)  # (sk, 1, D)
        allowed = _allowed_mask(sq, sk, torch.arange(sk), causal, (-1, -1), 0)
        # the inputs were already rounded to acc; _mla_attend rounds them to the matmul dtype
        o, l, _ = _mla_attend(q_all[qo[b]:qo[b + 1]], keys, allowed, float(sm_scale), Dc, prec)
        out[qo[b]:qo[b + 1]] = o
        lse[qo[b]:qo[b + 1]] = l  # -inf for rows without a key; o is 0 there
    if return_lse_base2:
        lse = lse * (1.0 / math.log(2.0))
    return out.to(device=q_nope.device, dtype=q_nope.dtype), lse.to(device=q_nope.device, dtype=torch.float32)
