"""Context-parallel attention over ``torch.distributed`` (MATE's interleaved sharding).

Every sequence is spread over the W ranks of a process group by interleaving: token t of a
sequence lives on rank ``t mod W`` (for queries and for keys/values alike), as MATE's
``cp_world_size`` / ``cp_rank`` / ``cp_tot_seqused_k`` define it. A rank holds, per sequence,
the tokens ``r, r + W, r + 2W, ...`` in that order; :func:`shard` cuts such a share out of
a whole (ragged) tensor.

:func:`context_parallel_attention` returns, on each rank, the attention output and lse of
that rank's own query tokens against all keys of their sequences, equal to single-process
attention on the whole sequences. Three methods:

- ``"gather_q"`` (default): the op's own context parallelism. ``fmha_fwd`` with
  ``cp_world_size`` / ``cp_rank`` / ``cp_tot_seqused_k`` is defined for a rank that holds
  *all* queries and its interleaved *share of the keys* (a kv cache sharded over ranks), so
  here the keys and values stay put and the queries move: the queries are all-gathered, each
  rank runs the op on its own K/V shard, and an all-to-all hands every rank the W partial
  results of its own queries, which ``fmha_combine`` merges. Every mask of the op (causal,
  windows, attention chunks), softcap and sinks work, because the op evaluates them on
  global positions. Traffic per rank: all queries, plus W fp32 partial outputs of its own.
- ``"gather_kv"``: the K/V shards are all-gathered; this rank's queries attend each shard
  (partial attention with the causal mask in local indices, see :func:`_shard_partial`) and
  the W partials are merged with ``fmha_combine``. Causal or full attention only.
- ``"ring"``: like ``"gather_kv"``, but the shards travel around the ring (send to rank
  r+1, receive from r-1, overlapped with compute) and the partials are merged as they come,
  so no rank ever holds more than two K/V shards. Causal or full attention only.

Which to pick: ``"gather_q"`` moves queries and outputs, the others move K/V; so
``"gather_q"`` suits few queries over long sharded contexts (decode, chunked prefill against
a sharded cache), ``"gather_kv"`` / ``"ring"`` suit prefill with GQA (small K/V), and
``"ring"`` bounds memory.

All take ragged layouts: ``q (Tq_r, H, D)``, ``k (Tk_r, Hk, D)``, ``v (Tk_r, Hk, Dv)`` for
this rank's tokens, and the *global* ``cu_seqlens_q`` / ``cu_seqlens_k`` (the same on
every rank). Forward only. Works with any backend whose collectives the tensors' device
supports (gloo on the CPU, NCCL on GPUs).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import mate_ops  # noqa: F401  registers torch.ops.mate.*
from mate_ops._common import fp8_out_dtype, normalize_window

Tensor = torch.Tensor

__all__ = ["context_parallel_attention", "shard", "shard_rows", "shard_cu_seqlens"]

_METHODS = ("gather_q", "gather_kv", "ring")


def _host_cu(cu: Tensor, name: str) -> List[int]:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor (B+1,) of global cumulative sequence lengths, got "
                         f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} "
                         f"{tuple(cu.shape) if isinstance(cu, Tensor) else ''}")
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals}")
    return vals


def _count(length: int, world: int, rank: int) -> int:
    """How many of tokens 0..length-1 fall on ``rank`` (those with t mod world == rank)."""
    return (length - rank + world - 1) // world


def shard_rows(cu_seqlens: Tensor, world_size: int, rank: int) -> Tensor:
    """Rows of the whole ragged tensor that make up ``rank``'s share, in the share's order.

    Args:
        cu_seqlens: int32 ``(B+1,)`` global cumulative lengths.
        world_size, rank: the interleave (token t of each sequence goes to rank t mod W).

    Returns:
        int64 ``(T_r,)`` on the CPU: for each sequence b, ``cu[b] + rank, cu[b] + rank + W, ...``.
    """
    cu = _host_cu(cu_seqlens, "cu_seqlens")
    _check_world(world_size, rank)
    rows = [torch.arange(min(a + rank, b), b, world_size, dtype=torch.int64) for a, b in zip(cu, cu[1:])]
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)


def shard_cu_seqlens(cu_seqlens: Tensor, world_size: int, rank: int) -> Tensor:
    """``cu_seqlens`` of ``rank``'s share: int32 ``(B+1,)`` on ``cu_seqlens``' device."""
    cu = _host_cu(cu_seqlens, "cu_seqlens")
    _check_world(world_size, rank)
    counts = [_count(b - a, world_size, rank) for a, b in zip(cu, cu[1:])]
    out = torch.zeros(len(cu), dtype=torch.int32)
    out[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return out.to(cu_seqlens.device)


def shard(x: Tensor, cu_seqlens: Tensor, world_size: int, rank: int) -> Tensor:
    """``rank``'s interleaved share of a whole ragged tensor ``x (T, ...)`` (a copy)."""
    if x.shape[0] != int(cu_seqlens[-1]):
        raise ValueError(f"x has {x.shape[0]} rows but cu_seqlens[-1] = {int(cu_seqlens[-1])}")
    return x[shard_rows(cu_seqlens, world_size, rank).to(x.device)]


def _check_world(world_size: int, rank: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got world_size={world_size!r}, "
                         f"rank={rank!r}")


def _check_inputs(q, k, v, cu_q, cu_k, world, rank) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (this rank's tokens, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if len(cu_k) != len(cu_q):
        raise ValueError(f"cu_seqlens_k has {len(cu_k) - 1} sequences but cu_seqlens_q has {len(cu_q) - 1}")
    want_q = sum(_count(b - a, world, rank) for a, b in zip(cu_q, cu_q[1:]))
    want_k = sum(_count(b - a, world, rank) for a, b in zip(cu_k, cu_k[1:]))
    if q.shape[0] != want_q:
        raise ValueError(f"q has {q.shape[0]} rows but rank {rank} of {world} owns {want_q} query tokens of "
                         "cu_seqlens_q (token t of a sequence on rank t mod world_size)")
    if k.shape[0] != want_k:
        raise ValueError(f"k has {k.shape[0]} rows but rank {rank} of {world} owns {want_k} key tokens of "
                         "cu_seqlens_k (token t of a sequence on rank t mod world_size)")
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have k's rows and heads {tuple(k.shape[:2])}, got {tuple(v.shape[:2])}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[Optional[int]] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    learnable_sink: Optional[Tensor] = None,
    method: str = "gather_q",
) -> Tuple[Tensor, Tensor]:
    """Attention of this rank's interleaved query tokens against every key of their sequences.

    Collective: every rank of ``group`` must call it with the same ``cu_seqlens_*``, options
    and method.

    Args:
        q: ``(Tq_r, H, D)``, this rank's query tokens: of each sequence b, tokens
            ``r, r + W, ...`` in order (:func:`shard`).
        k, v: ``(Tk_r, Hk, D)`` / ``(Tk_r, Hk, Dv)``, this rank's key/value tokens, likewise.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B+1,)``, the *global* sequence boundaries (the
            whole sequences, not this rank's share), identical on every rank.
        group: the process group (default: the default group); W is its size, r this
            process's rank in it.
        softmax_scale, causal, window_size, attention_chunk, softcap, learnable_sink: as in
            ``flash_attn_varlen_func``, applied to the whole sequences (bottom-right aligned
            on the global lengths). ``"gather_kv"`` and ``"ring"`` support neither windows
            nor chunks.
        method: ``"gather_q"`` (the op's context parallelism: gathers q, keeps K/V),
            ``"gather_kv"`` (gathers the K/V shards) or ``"ring"`` (passes K/V shards
            around); see the module docstring.

    Returns:
        ``(out (Tq_r, H, Dv), lse (H, Tq_r) fp32)`` for this rank's query tokens, out in q's
        dtype (bf16 for fp8 inputs); a query with no key gets out 0 and lse -inf (or the sink).

    Raises:
        ValueError: naming the argument, before any communication (every rank raises alike).
        RuntimeError: when torch.distributed is not initialized.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs torch.distributed to be initialized "
                           "(torch.distributed.init_process_group)")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cu_q, cu_k = _host_cu(cu_seqlens_q, "cu_seqlens_q"), _host_cu(cu_seqlens_k, "cu_seqlens_k")
    _check_inputs(q, k, v, cu_q, cu_k, world, rank)
    left, right = normalize_window(window_size)
    if method != "gather_q" and (left >= 0 or right >= 0 or attention_chunk):
        raise ValueError(f"method={method!r} supports causal or full attention only, got window_size={window_size!r}, "
                         f"attention_chunk={attention_chunk}; use method='gather_q'")
    if method != "gather_q" and k.dtype != v.dtype:
        raise ValueError(f"method={method!r} needs k and v of one dtype (they travel in one buffer), got {k.dtype} "
                         f"and {v.dtype}")
    opts = dict(softmax_scale=softmax_scale, causal=causal, softcap=softcap)
    if method == "gather_q":
        return _gather_q(q, k, v, cu_q, cu_k, world, rank, group, learnable_sink,
                         dict(opts, window_size_left=left, window_size_right=right, attention_chunk=attention_chunk))
    return (_gather_kv if method == "gather_kv" else _ring)(q, k, v, cu_q, cu_k, world, rank, group, learnable_sink,
                                                             opts)


def _i32(values, device) -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (collectives need equal sizes on every rank)."""
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[:x.shape[0]] = x
    return out


def _gather_q(q, k, v, cu_q, cu_k, world, rank, group, sink, opts):
    dev = q.device
    rows = [shard_rows(_i32(cu_q, "cpu"), world, s) for s in range(world)]
    nq = [int(r.numel()) for r in rows]
    mq = max(nq)  # rank 0 owns the most tokens
    # 1. every rank gets all queries, in global order
    parts = [torch.empty((mq, *q.shape[1:]), dtype=q.dtype, device=dev) for _ in range(world)]
    dist.all_gather(parts, _pad_rows(q, mq), group=group)
    q_all = q.new_empty((cu_q[-1], *q.shape[1:]))
    q_all[torch.cat(rows).to(dev)] = torch.cat([p[:n] for p, n in zip(parts, nq)])
    # 2. partial attention on this rank's key shard; the op maps local key j to global j*W + r
    kn = [_count(b - a, world, rank) for a, b in zip(cu_k, cu_k[1:])]
    cu_k_local = _cu(kn)
    out_p, lse_p = torch.ops.mate.fmha_fwd(
        q_all, k, v, cu_seqlens_q=_i32(cu_q, dev), cu_seqlens_k=_i32(cu_k_local, dev),
        max_seqlen_q=max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0), max_seqlen_k=max(kn, default=0),
        # the sink joins one softmax denominator: give it to one rank's partial only
        learnable_sink=sink if rank == 0 else None,
        cp_world_size=world, cp_rank=rank, cp_tot_seqused_k=_i32([b - a for a, b in zip(cu_k, cu_k[1:])], dev),
        out_dtype=torch.float32, **opts)
    # 3. all-to-all: rank s receives every rank's partial for its own query rows
    H, Dv = out_p.shape[1], out_p.shape[2]
    send_o = out_p.new_zeros((world, mq, H, Dv))
    send_l = lse_p.new_full((world, mq, H), float("-inf"))
    lse_rows = lse_p.t()  # (Tq, H)
    for s in range(world):
        idx = rows[s].to(dev)
        send_o[s, :nq[s]] = out_p[idx]
        send_l[s, :nq[s]] = lse_rows[idx]
    recv_o, recv_l = torch.empty_like(send_o), torch.empty_like(send_l)
    dist.all_to_all_single(recv_o, send_o, group=group)
    dist.all_to_all_single(recv_l, send_l, group=group)
    # 4. merge the W partials (fmha_combine's varlen form: (splits, Tq, H, Dv))
    n = nq[rank]
    out, lse = torch.ops.mate.fmha_combine(recv_o[:, :n].contiguous(), recv_l[:, :n].contiguous(),
                                           out_dtype=fp8_out_dtype(q))
    return out, lse.t().contiguous()


def _cu(counts) -> List[int]:
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out


class _Shards:
    """Per-sequence token counts of the interleave, for the K/V-moving methods."""

    def __init__(self, cu_q, cu_k, world, rank, dev):
        self.world, self.rank, self.dev = world, rank, dev
        self.lq = [b - a for a, b in zip(cu_q, cu_q[1:])]
        self.lk = [b - a for a, b in zip(cu_k, cu_k[1:])]
        self.nq = [_count(n, world, rank) for n in self.lq]
        self.nk = [[_count(n, world, s) for n in self.lk] for s in range(world)]
        self.cu_q = _i32(_cu(self.nq), dev)
        self.rows_k = sum(self.nk[0])  # rank 0 owns the most key tokens: the size of every message


def _shard_partial(q, kv, D, src, sh: _Shards, sink, opts):
    """Partial (out fp32, lse (Tq_r, H)) of this rank's queries against rank ``src``'s K/V shard.

    Query token i*W + r may see key token j*W + src under causal iff
    ``j <= i + floor((r - src + Lk - Lq) / W)``: a causal mask between local indices with a
    shifted diagonal. The op's bottom-right causal mask over the first ``nq + shift`` keys of
    the shard is exactly that, so the key count is cut with ``seqused_k``.
    """
    kw = dict(opts)
    nk = sh.nk[src]
    if opts["causal"]:
        kw["seqused_k"] = _i32([max(0, min(nk[b], sh.nq[b] + (sh.rank - src + sh.lk[b] - sh.lq[b]) // sh.world))
                                for b in range(len(nk))], sh.dev)
    o, lse = torch.ops.mate.fmha_fwd(
        q, kv[..., :D], kv[..., D:], cu_seqlens_q=sh.cu_q, cu_seqlens_k=_i32(_cu(nk), sh.dev),
        max_seqlen_q=max(sh.nq, default=0), max_seqlen_k=max(nk, default=0),
        learnable_sink=sink, out_dtype=torch.float32, **kw)
    return o, lse.t()


def _gather_kv(q, k, v, cu_q, cu_k, world, rank, group, sink, opts):
    sh = _Shards(cu_q, cu_k, world, rank, q.device)
    # k and v travel together in one buffer, padded to the largest shard
    mine = _pad_rows(torch.cat([k, v], dim=-1), sh.rows_k)
    shards = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shards, mine, group=group)
    # the sink joins one softmax denominator: give it to one partial only
    parts = [_shard_partial(q, shards[s], k.shape[-1], s, sh, sink if s == 0 else None, opts) for s in range(world)]
    out, lse = torch.ops.mate.fmha_combine(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]),
                                           out_dtype=fp8_out_dtype(q))
    return out, lse.t().contiguous()


def _ring(q, k, v, cu_q, cu_k, world, rank, group, sink, opts):
    sh = _Shards(cu_q, cu_k, world, rank, q.device)
    buf = _pad_rows(torch.cat([k, v], dim=-1), sh.rows_k)
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    acc_o = acc_l = None
    for step in range(world):
        src = (rank - step) % world  # the rank whose shard we hold now
        reqs = []
        if step + 1 < world:  # post the next transfer before computing on this shard
            incoming = torch.empty_like(buf)
            reqs = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, buf, peer((rank + 1) % world), group),
                dist.P2POp(dist.irecv, incoming, peer((rank - 1) % world), group),
            ])
        o, lse = _shard_partial(q, buf, k.shape[-1], src, sh, sink if step == 0 else None, opts)
        if acc_o is None:
            acc_o, acc_l = o, lse
        else:  # a running merge keeps one partial result, whatever W is
            acc_o, acc_l = torch.ops.mate.fmha_combine(torch.stack([acc_o, o]), torch.stack([acc_l, lse]),
                                                       out_dtype=torch.float32)
        for req in reqs:
            req.wait()
        if reqs:
            buf = incoming
    return acc_o.to(fp8_out_dtype(q)), acc_l.t().contiguous()
