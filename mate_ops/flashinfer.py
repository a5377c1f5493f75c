"""FlashInfer's MLA wrapper (``flashinfer.mla.BatchMLAPagedAttentionWrapper``) on
``torch.ops.mate`` (SEMANTICS §4).

``plan`` reads the index tensors on the host (it may synchronize) and builds a page table;
``run`` is a single ``torch.ops.mate.fmha_fwd`` call, so it traces under ``torch.compile``:
scores ``sm_scale * (<q_nope, ckv> + <q_pe, kpe>)`` are the FMHA op with ``q = q_pe``,
``k = kpe``, ``qv = q_nope`` and ``v = ckv``. Forward only.
"""
import math
from typing import Optional

import torch

__all__ = ["BatchMLAPagedAttentionWrapper"]

_LN2 = math.log(2.0)


class BatchMLAPagedAttentionWrapper:
    """Batched MLA attention over paged ``ckv``/``kpe`` caches (FlashInfer signature).

    Args:
        float_workspace_buffer: accepted for compatibility (the CPU kernels need no workspace).
        use_cuda_graph: keep every tensor ``run`` reads at a fixed address across ``plan`` calls;
            then ``qo_indptr``, ``kv_indptr``, ``kv_indices`` and ``kv_len_arr`` must be given
            here and ``plan`` copies into them.
        backend: ``"auto"`` or a FlashInfer backend name; all compute the same result here.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool = False,
                 qo_indptr: Optional[torch.Tensor] = None, kv_indptr: Optional[torch.Tensor] = None,
                 kv_indices: Optional[torch.Tensor] = None, kv_len_arr: Optional[torch.Tensor] = None,
                 backend: str = "auto"):
        self._device = float_workspace_buffer.device
        self._use_cuda_graph = use_cuda_graph
        if use_cuda_graph and any(t is None for t in (qo_indptr, kv_indptr, kv_indices, kv_len_arr)):
            raise ValueError("use_cuda_graph=True needs qo_indptr, kv_indptr, kv_indices and kv_len_arr buffers")
        self._qo_indptr_buf, self._kv_indptr_buf = qo_indptr, kv_indptr
        self._kv_indices_buf, self._kv_len_arr_buf = kv_indices, kv_len_arr
        self._page_table_buf: Optional[torch.Tensor] = None
        self._plan = None

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_len_arr: torch.Tensor, num_heads: int, head_dim_ckv: int, head_dim_kpe: int, page_size: int,
             causal: bool, sm_scale: float, q_data_type: torch.dtype, kv_data_type: torch.dtype) -> None:
        """Record the batch layout: sequence b owns queries ``qo_indptr[b]:qo_indptr[b+1]``, pages
        ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` and ``kv_len_arr[b]`` keys; causal is
        bottom-right aligned. May synchronize with the device."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        qo = qo_indptr.to("cpu", torch.int64)
        kvp = kv_indptr.to("cpu", torch.int64)
        lens = kv_len_arr.to("cpu", torch.int64)
        idx = kv_indices.to("cpu", torch.int64)
        batch = qo.numel() - 1
        if kvp.numel() != batch + 1 or lens.numel() != batch:
            raise ValueError(f"qo_indptr ({qo.numel()}), kv_indptr ({kvp.numel()}) and kv_len_arr ({lens.numel()}) "
                             "must describe the same batch: B + 1, B + 1 and B entries")
        if batch < 0 or int(qo[0]) < 0 or bool((qo[1:] < qo[:-1]).any()):
            raise ValueError("qo_indptr must be non-decreasing offsets starting at >= 0")
        if int(kvp[0]) < 0 or bool((kvp[1:] < kvp[:-1]).any()) or int(kvp[-1]) > idx.numel():
            raise ValueError(f"kv_indptr must be non-decreasing offsets into the {idx.numel()} kv_indices")
        if bool((lens < 0).any()):
            raise ValueError("kv_len_arr entries must be >= 0")
        if bool((idx < 0).any()):
            raise ValueError("kv_indices entries must be >= 0 (page ids)")
        pages = [idx[int(kvp[b]):int(kvp[b + 1])] for b in range(batch)]
        for b in range(batch):
            if int(lens[b]) > pages[b].numel() * page_size:
                raise ValueError(f"kv_len_arr[{b}] = {int(lens[b])} needs more than the {pages[b].numel()} pages "
                                 f"of size {page_size} given to sequence {b}")
        max_pages = max([1] + [p.numel() for p in pages])
        table = torch.zeros(batch, max_pages, dtype=torch.int32)
        for b, p in enumerate(pages):
            table[b, :p.numel()] = p.to(torch.int32)
        qo_i32 = qo.to(torch.int32)
        lens_i32 = lens.to(torch.int32)
        if self._use_cuda_graph:
            table = self._into(self._page_table_buf, table, "page table")
            self._page_table_buf = table
            self._qo_indptr_buf[: batch + 1].copy_(qo_i32)
            self._kv_len_arr_buf[:batch].copy_(lens_i32)
            self._kv_indptr_buf[: batch + 1].copy_(kvp.to(self._kv_indptr_buf.dtype))
            self._kv_indices_buf[: idx.numel()].copy_(idx.to(self._kv_indices_buf.dtype))
            qo_dev, lens_dev = self._qo_indptr_buf[: batch + 1], self._kv_len_arr_buf[:batch]
            if qo_dev.dtype != torch.int32 or lens_dev.dtype != torch.int32:
                raise ValueError("with use_cuda_graph, qo_indptr and kv_len_arr buffers must be int32")
        else:
            table = table.to(self._device)
            qo_dev, lens_dev = qo_i32.to(self._device), lens_i32.to(self._device)
        # max_seqlen_q is not recorded: a Python int here would specialize compiled run() calls
        self._plan = dict(cu_seqlens_q=qo_dev, seqused_k=lens_dev, page_table=table, causal=causal,
                          softmax_scale=sm_scale, num_heads=num_heads, head_dim_ckv=head_dim_ckv,
                          head_dim_kpe=head_dim_kpe, page_size=page_size, total_q=int(qo[-1]),
                          max_page=int(table.max()) if table.numel() else 0)

    def _check_run_args(self, q_nope, q_pe, ckv_cache, kpe_cache):
        """run()'s tensors must match the planned layout (shapes only: no device sync)."""
        p = self._plan
        H, dc, dk, P = p["num_heads"], p["head_dim_ckv"], p["head_dim_kpe"], p["page_size"]
        expect = [("q_nope", q_nope, (None, H, dc)), ("q_pe", q_pe, (None, H, dk)),
                  ("ckv_cache", ckv_cache, (None, P, dc)), ("kpe_cache", kpe_cache, (None, P, dk))]
        for name, t, shape in expect:
            if t.dim() != 3 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
                raise ValueError(f"{name} must have shape (*, {', '.join(str(x) for x in shape[1:])}) as planned "
                                 f"(num_heads={H}, head_dim_ckv={dc}, head_dim_kpe={dk}, page_size={P}), "
                                 f"got {tuple(t.shape)}")
        if q_pe.shape[0] != q_nope.shape[0]:
            raise ValueError(f"q_nope and q_pe must have the same rows, got {q_nope.shape[0]} and {q_pe.shape[0]}")
        if kpe_cache.shape[0] != ckv_cache.shape[0]:
            raise ValueError(f"ckv_cache and kpe_cache must have the same number of pages, got {ckv_cache.shape[0]} "
                             f"and {kpe_cache.shape[0]}")
        # Checks against per-plan numbers run eagerly only: under torch.compile they would
        # specialize the graph on every plan (the op itself still range-checks on the CPU).
        if not torch.compiler.is_compiling():
            if q_nope.shape[0] < p["total_q"]:
                raise ValueError(f"qo_indptr[-1] = {p['total_q']} exceeds the {q_nope.shape[0]} rows of q_nope / q_pe")
            if ckv_cache.shape[0] <= p["max_page"]:
                raise ValueError(f"kv_indices holds page id {p['max_page']}, out of range for ckv_cache / kpe_cache "
                                 f"with {ckv_cache.shape[0]} pages")
        dtypes = {q_nope.dtype, q_pe.dtype, ckv_cache.dtype, kpe_cache.dtype}
        if len(dtypes) != 1:
            raise ValueError(f"q_nope, q_pe, ckv_cache and kpe_cache must share one dtype, got "
                             f"{q_nope.dtype}, {q_pe.dtype}, {ckv_cache.dtype}, {kpe_cache.dtype}")

    @staticmethod
    def _check_outputs(q_nope, out, lse):
        """run()'s ``out``/``lse`` buffers must be exactly what run() returns (checked before any work)."""
        rows, heads = q_nope.shape[0], q_nope.shape[1]
        want = [("out", out, (rows, heads, q_nope.shape[2]), q_nope.dtype),
                ("lse", lse, (rows, heads), torch.float32)]
        for name, t, shape, dtype in want:
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (q_nope rows, num_heads"
                                 f"{', head_dim_ckv' if name == 'out' else ''}), got {tuple(t.shape)}")
            if t.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}{' (q_nope dtype)' if name == 'out' else ''}, "
                                 f"got {t.dtype}")
            if t.device != q_nope.device:
                raise ValueError(f"{name} must be on q_nope's device {q_nope.device}, got {t.device}")

    def _into(self, buf, table, what):
        if buf is None:
            return table.to(self._device)
        if table.shape[0] > buf.shape[0] or table.shape[1] > buf.shape[1]:
            raise ValueError(f"with use_cuda_graph the {what} of the first plan ({tuple(buf.shape)}) cannot grow to "
                             f"{tuple(table.shape)}")
        buf.zero_()
        buf[: table.shape[0], : table.shape[1]].copy_(table)
        return buf

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
            return_lse_base_on_e: bool = False):
        """Attention for the planned batch.

        Args:
            q_nope ``(total_q, H, head_dim_ckv)``, q_pe ``(total_q, H, head_dim_kpe)``,
            ckv_cache ``(num_pages, page_size, head_dim_ckv)``, kpe_cache ``(num_pages, page_size,
            head_dim_kpe)``; ``out`` ``(total_q, H, head_dim_ckv)`` in q_nope's dtype and ``lse``
            fp32 ``(total_q, H)``: optional outputs written in place (a wrong shape, dtype or
            device raises ``ValueError`` before any work).
            return_lse_base_on_e: natural-log lse instead of FlashInfer's base 2.

        Returns:
            ``out (total_q, H, head_dim_ckv)``, or ``(out, lse (total_q, H))`` with ``return_lse``;
            rows with no key: out 0, lse -inf.
        """
        if self._plan is None:
            raise RuntimeError("call plan() before run()")
        p = self._plan
        self._check_run_args(q_nope, q_pe, ckv_cache, kpe_cache)
        self._check_outputs(q_nope, out, lse)
        o, lse_e = torch.ops.mate.fmha_fwd(
            q_pe, kpe_cache.unsqueeze(2), ckv_cache.unsqueeze(2), cu_seqlens_q=p["cu_seqlens_q"],
            seqused_k=p["seqused_k"], page_table=p["page_table"], qv=q_nope,
            softmax_scale=p["softmax_scale"], causal=p["causal"], num_splits=1)
        lse_out = lse_e.t() if return_lse_base_on_e else lse_e.t() / _LN2
        if out is not None:
            out.copy_(o)
            o = out
        if lse is not None:
            lse.copy_(lse_out)
            lse_out = lse
        return (o, lse_out) if return_lse else o
