"""Test-data helpers: poisoned buffers, random sequence lengths, paged k/v pools."""
from typing import Optional, Sequence, Tuple, Union

import torch

from ._dtypes import _is_fp8

Tensor = torch.Tensor

__all__ = ["poison_", "random_seqlens", "random_cu_seqlens", "make_paged_kv"]


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


def to_device_keeping_layout(t: Tensor, device) -> Tensor:
    """``t`` on ``device`` with its strides and storage offset kept (``Tensor.to`` makes a
    dense copy of a strided view, which breaks layouts such as the FP8 MODEL1 block view)."""
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


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
