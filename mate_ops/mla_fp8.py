"""The FP8 MLA kv-cache formats (SEMANTICS §3, "FP8 caches"): pure PyTorch, no extension.

FlashMLA's kernels (and ``torch.ops.mate.mla_decode`` with ``is_fp8_kvcache=True``) read a
paged latent cache stored as raw bytes in one of two layouts:

* **V3.2** (DeepSeek-V3.2, q head dim 576 = 512 latent + 64 rope), 656 bytes per token,
  cache ``(num_blocks, P, 1, 656)``: 512 float8_e4m3fn latent values, 4 fp32 scales (one per
  128 latent values), 64 bf16 rope values. See :func:`quantize_mla_v32`.
* **MODEL1** (q head dim 512 = 448 latent + 64 rope), 584 bytes per token: per block, the
  576-byte ``[448 e4m3 | 64 bf16]`` parts of all P tokens, then P x 8 scale bytes (7 ue8m0
  exponents, one per 64 latent values, + 1 pad byte); the block stride is rounded up to a
  multiple of 576 (:func:`mla_model1_block_stride`). See :func:`quantize_mla_model1`.

The quantizers build caches from bf16 (users and tests both need them); the dequantizers read
them back to fp32 exactly as a kernel does (``fp8 * scale`` rounded to fp32). The functions
work on any device: the byte shuffling runs on the CPU and the result is moved back. This
module imports only ``math`` and ``torch`` (never the extension): the oracle,
:mod:`mate_ops.testing`, reads FP8 caches with it.

Decisions on points docs/semantics.md leaves open (following FlashMLA's ``tests/quant.py``):

- The scale exponent ``k = ceil(log2(amax / 448))`` is computed exactly (smallest k with
  ``amax <= 448 * 2**k``), then clamped to ``k >= -126`` so the scale is always a normal fp32 /
  a nonzero ue8m0 (only matters for amax < ~5e-36); amax 0 gives scale 1. Non-finite inputs
  raise ValueError. FlashMLA's own quantizer clamps amax/448 at 1e-4 instead; the kernels only
  read the scales, so both produce valid caches.
- A ue8m0 byte 255 (NaN in float8_e8m0fnu) dequantizes to NaN.
"""
import math

import torch

Tensor = torch.Tensor

__all__ = [
    "V32_BYTES_PER_TOKEN",
    "MODEL1_BYTES_PER_TOKEN",
    "quantize_mla_v32",
    "dequantize_mla_v32",
    "quantize_mla_model1",
    "dequantize_mla_model1",
    "mla_model1_block_stride",
    "dequantize_mla",
]

#: Bytes per token of a V3.2 FP8 cache: 512 e4m3 + 4 fp32 scales + 64 bf16.
V32_BYTES_PER_TOKEN = 656
#: Bytes per token of a MODEL1 FP8 cache: 448 e4m3 + 64 bf16 (576 bytes) + 8 scale bytes (7 ue8m0 + pad).
MODEL1_BYTES_PER_TOKEN = 584
_V32_BYTES = V32_BYTES_PER_TOKEN
_MODEL1_BYTES = MODEL1_BYTES_PER_TOKEN
_FP8_MAX = 448.0


def _pow2_exponent(amax: Tensor) -> Tensor:
    """Smallest integer k with ``amax <= 448 * 2**k`` (int64), clamped to k >= -126; amax 0 -> 0.

    Starts from ``ceil(log2(amax / 448))`` in fp64 and then corrects it with exact
    comparisons (multiplying by a power of two is exact), so rounding in log2 can never
    give a scale that makes ``|x| / scale > 448``.
    """
    a = amax.to(torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("kv must be finite to be quantized to fp8")
    pos = a > 0
    safe = torch.where(pos, a, torch.ones_like(a))
    k = torch.ceil(torch.log2(safe / _FP8_MAX))
    k = torch.where(safe > _FP8_MAX * torch.pow(2.0, k), k + 1, k)  # too small: bump up
    k = torch.where(safe <= _FP8_MAX * torch.pow(2.0, k - 1), k - 1, k)  # not minimal: step down
    k = torch.clamp(k, min=-126.0)
    k = torch.where(pos, k, torch.zeros_like(k))
    return k.to(torch.int64)


def _to_e4m3_bytes(x: Tensor) -> Tensor:
    """float values (|x| <= 448) -> their float8_e4m3fn bit patterns as uint8 (round to nearest even)."""
    return x.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)


def _from_e4m3_bytes(b: Tensor) -> Tensor:
    """uint8 float8_e4m3fn bit patterns -> float64 values."""
    return b.contiguous().view(torch.float8_e4m3fn).to(torch.float64)


def _u32_to_le_bytes(bits: Tensor) -> Tensor:
    """int64 tensor of 32-bit patterns (...,) -> uint8 (..., 4), little-endian byte order."""
    return torch.stack([(bits >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def _le_bytes_to_u32(b: Tensor) -> Tensor:
    """uint8 (..., 4) little-endian -> int64 32-bit pattern (...,)."""
    b = b.to(torch.int64)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _f32_to_le_bytes(x: Tensor) -> Tensor:
    """float32 (...,) -> its IEEE bytes (..., 4), little-endian."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return _u32_to_le_bytes(bits)


def _le_bytes_to_f32(b: Tensor) -> Tensor:
    """uint8 (..., 4) little-endian IEEE float32 bytes -> float32 (...,)."""
    bits = _le_bytes_to_u32(b)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)  # as signed int32
    return bits.to(torch.int32).view(torch.float32)


def _bf16_to_le_bytes(x: Tensor) -> Tensor:
    """(...,) values rounded to bfloat16 -> their bytes (..., 2), little-endian."""
    bits = x.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return torch.stack([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)


def _le_bytes_to_bf16(b: Tensor) -> Tensor:
    """uint8 (..., 2) little-endian bfloat16 bytes -> bfloat16 (...,)."""
    b = b.to(torch.int64)
    bits = b[..., 0] | (b[..., 1] << 8)
    bits = torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits)  # as signed int16
    return bits.to(torch.int16).view(torch.bfloat16)


def _as_bytes(cache: Tensor, name: str) -> Tensor:
    """View a 1-byte-dtype tensor as uint8 (same shape, strides and storage)."""
    if cache.element_size() != 1:
        raise ValueError(f"{name} must have a 1-byte dtype (uint8, int8, float8), got {cache.dtype}")
    return cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)


def quantize_mla_v32(kv: Tensor) -> Tensor:
    """Quantize a bf16 MLA cache to FlashMLA's V3.2 FP8 layout (SEMANTICS §3, "FP8 caches").

    ``kv`` ``(num_blocks, P, 1, 576)`` (512 latent + 64 rope channels; bf16 expected, other
    float dtypes are accepted and their rope part is rounded to bf16). Returns a new
    contiguous uint8 tensor ``(num_blocks, P, 1, 656)``; per token:

    * bytes ``[0, 512)``: the 512 latent values as float8_e4m3fn, ``round(x / scale)``;
    * bytes ``[512, 528)``: 4 float32 scales (little-endian), scale g covering latent
      channels ``[128 g, 128 g + 128)``;
    * bytes ``[528, 656)``: the 64 rope values as bf16 (little-endian), unquantized.

    Each scale is ``2 ** ceil(log2(amax / 448))`` over its 128-group (so every quantized
    value lies in ``[-448, 448]``); amax 0 gives scale 1; the exponent is clamped to
    ``>= -126`` (normal fp32). Use :func:`dequantize_mla_v32` to read it back.
    """
    if kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != 576:
        raise ValueError(f"kv must be (num_blocks, P, 1, 576), got {tuple(kv.shape)}")
    if not kv.is_floating_point():
        raise ValueError(f"kv must be floating point, got {kv.dtype}")
    nb, P = kv.shape[0], kv.shape[1]
    x = kv.detach().cpu().reshape(nb, P, 576)
    latent = x[..., :512].to(torch.float64).reshape(nb, P, 4, 128)
    rope = x[..., 512:]
    k = _pow2_exponent(latent.abs().amax(dim=-1))  # (nb, P, 4)
    scale = torch.pow(2.0, k.to(torch.float64))  # exact powers of two
    q8 = _to_e4m3_bytes(latent / scale.unsqueeze(-1)).reshape(nb, P, 512)
    out = torch.zeros(nb, P, _V32_BYTES, dtype=torch.uint8)
    out[..., 0:512] = q8
    out[..., 512:528] = _f32_to_le_bytes(scale.to(torch.float32)).reshape(nb, P, 16)
    out[..., 528:656] = _bf16_to_le_bytes(rope).reshape(nb, P, 128)
    return out.reshape(nb, P, 1, _V32_BYTES).to(kv.device)


def dequantize_mla_v32(cache: Tensor) -> Tensor:
    """Read a V3.2 FP8 MLA cache (see :func:`quantize_mla_v32`) back to float32.

    ``cache`` ``(num_blocks, P, 1, 656)`` of any 1-byte dtype (uint8, int8, float8; it is
    reinterpreted as raw bytes). Returns float32 ``(num_blocks, P, 1, 576)``: latent
    channel c is ``e4m3(byte c) * scale[c // 128]`` (product rounded to fp32, as a kernel
    computes it) and rope channel ``512 + r`` is the bf16 at bytes ``528 + 2r``.
    """
    u8 = _as_bytes(cache, "cache")
    if u8.dim() != 4 or u8.shape[2] != 1 or u8.shape[3] != _V32_BYTES:
        raise ValueError(f"a V3.2 fp8 cache must be (num_blocks, P, 1, 656), got {tuple(u8.shape)}")
    nb, P = u8.shape[0], u8.shape[1]
    b = u8.detach().cpu().reshape(nb, P, _V32_BYTES)
    fp8 = _from_e4m3_bytes(b[..., 0:512]).reshape(nb, P, 4, 128)
    scale = _le_bytes_to_f32(b[..., 512:528].reshape(nb, P, 4, 4)).to(torch.float64)
    latent = (fp8 * scale.unsqueeze(-1)).to(torch.float32).reshape(nb, P, 512)
    rope = _le_bytes_to_bf16(b[..., 528:656].reshape(nb, P, 64, 2)).to(torch.float32)
    return torch.cat([latent, rope], dim=-1).reshape(nb, P, 1, 576).to(cache.device)


def mla_model1_block_stride(page_size: int) -> int:
    """Byte stride of one block of a MODEL1 FP8 cache: ``P * 584`` rounded up to a multiple of 576."""
    raw = int(page_size) * _MODEL1_BYTES
    return (raw + 575) // 576 * 576


def quantize_mla_model1(kv: Tensor) -> Tensor:
    """Quantize a bf16 MLA cache to FlashMLA's MODEL1 FP8 layout (SEMANTICS §3, "FP8 caches").

    ``kv`` ``(num_blocks, P, 1, 512)``: 448 latent + 64 rope channels (bf16 expected).
    Byte layout of block n, which starts at byte ``n * block_stride`` of a flat buffer
    (``block_stride = mla_model1_block_stride(P)``, i.e. ``P * 584`` rounded up to a
    multiple of 576):

    * bytes ``[576 t, 576 t + 448)``: token t's 448 latent values as float8_e4m3fn;
    * bytes ``[576 t + 448, 576 t + 576)``: token t's 64 rope values as bf16 (little-endian);
    * bytes ``[576 P + 8 t, 576 P + 8 t + 7)``: token t's 7 ue8m0 scale exponents ``e``
      (scale ``2 ** (e - 127)``, one per 64 latent channels), then 1 zero pad byte;
    * the rest of the block stride is zero padding.

    Scale exponents: ``e = 127 + ceil(log2(amax / 448))`` (amax 0 -> e = 127; clamped to
    ``e >= 1``).

    Returns a uint8 tensor VIEW of shape ``(num_blocks, P, 1, 584)`` with strides
    ``(block_stride, 584, 584, 1)`` over a flat buffer of ``num_blocks * block_stride``
    bytes (what FlashMLA's kernels take). Only the shape and the block stride are
    meaningful: ``view[n, t]`` is NOT token t's data (tokens are split into the
    576-byte part and the 8-byte scale part above). Read it with
    :func:`dequantize_mla_model1`; do not ``.contiguous()`` / ``.clone()`` it (that
    drops the padding and the real layout).
    """
    if kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != 512:
        raise ValueError(f"kv must be (num_blocks, P, 1, 512), got {tuple(kv.shape)}")
    if not kv.is_floating_point():
        raise ValueError(f"kv must be floating point, got {kv.dtype}")
    nb, P = kv.shape[0], kv.shape[1]
    stride = mla_model1_block_stride(P)
    x = kv.detach().cpu().reshape(nb, P, 512)
    latent = x[..., :448].to(torch.float64).reshape(nb, P, 7, 64)
    rope = x[..., 448:]
    k = _pow2_exponent(latent.abs().amax(dim=-1))  # (nb, P, 7)
    scale = torch.pow(2.0, k.to(torch.float64))
    q8 = _to_e4m3_bytes(latent / scale.unsqueeze(-1)).reshape(nb, P, 448)
    exps = (k + 127).to(torch.uint8)  # (nb, P, 7), in [1, 254]

    flat = torch.zeros(nb, stride, dtype=torch.uint8)
    tok = flat[:, : P * 576].view(nb, P, 576)  # the per-token data part
    tok[..., 0:448] = q8
    tok[..., 448:576] = _bf16_to_le_bytes(rope).reshape(nb, P, 128)
    sc = flat[:, P * 576: P * 576 + P * 8].view(nb, P, 8)  # the scale part
    sc[..., 0:7] = exps
    sc[..., 7] = 0
    flat = flat.reshape(-1).to(kv.device)
    return torch.as_strided(flat, (nb, P, 1, _MODEL1_BYTES), (stride, _MODEL1_BYTES, _MODEL1_BYTES, 1), 0)


def dequantize_mla_model1(cache: Tensor) -> Tensor:
    """Read a MODEL1 FP8 MLA cache (see :func:`quantize_mla_model1`) back to float32.

    ``cache`` is a ``(num_blocks, P, 1, 584)`` view of any 1-byte dtype whose
    ``stride(0)`` is the block's byte stride (>= ``P * 584``); block n's bytes start at
    ``cache.storage_offset() + n * cache.stride(0)`` of its storage. The other strides
    are ignored. Returns float32 ``(num_blocks, P, 1, 512)``: latent channel c of token t
    is ``e4m3(byte 576 t + c) * 2 ** (e_{c // 64} - 127)``, rope channel ``448 + r`` the
    bf16 at bytes ``576 t + 448 + 2 r``, with the exponents ``e`` at ``576 P + 8 t``.
    """
    u8 = _as_bytes(cache, "cache")
    if u8.dim() != 4 or u8.shape[2] != 1 or u8.shape[3] != _MODEL1_BYTES:
        raise ValueError(f"a MODEL1 fp8 cache must be (num_blocks, P, 1, 584), got {tuple(u8.shape)}")
    nb, P = u8.shape[0], u8.shape[1]
    stride = u8.stride(0) if nb > 1 else max(u8.stride(0), P * _MODEL1_BYTES)
    if stride < P * _MODEL1_BYTES:
        raise ValueError(f"cache block stride {stride} bytes is smaller than P * 584 = {P * _MODEL1_BYTES}")
    # The raw bytes of every block: (nb, P * 584) starting at each block's first byte.
    # as_strided checks that this stays inside the tensor's storage.
    blocks = torch.as_strided(u8.detach(), (nb, P * _MODEL1_BYTES), (stride, 1), u8.storage_offset())
    blocks = blocks.cpu().clone()
    tok = blocks[:, : P * 576].reshape(nb, P, 576)
    exps = blocks[:, P * 576:].reshape(nb, P, 8)[..., :7].to(torch.float64)  # (nb, P, 7)
    scale = torch.where(exps == 255, torch.full_like(exps, math.nan), torch.pow(2.0, exps - 127))
    fp8 = _from_e4m3_bytes(tok[..., 0:448]).reshape(nb, P, 7, 64)
    latent = (fp8 * scale.unsqueeze(-1)).to(torch.float32).reshape(nb, P, 448)
    rope = _le_bytes_to_bf16(tok[..., 448:576].reshape(nb, P, 64, 2)).to(torch.float32)
    return torch.cat([latent, rope], dim=-1).reshape(nb, P, 1, 512).to(cache.device)


def dequantize_mla(cache: Tensor) -> Tensor:
    """Read either FP8 MLA layout back to float32, picking it from the bytes per token.

    ``cache.shape[-1] == 656``: :func:`dequantize_mla_v32` -> ``(num_blocks, P, 1, 576)``;
    ``584``: :func:`dequantize_mla_model1` -> ``(num_blocks, P, 1, 512)``. Anything else raises
    ``ValueError``.
    """
    if cache.dim() >= 1 and cache.shape[-1] == _V32_BYTES:
        return dequantize_mla_v32(cache)
    if cache.dim() >= 1 and cache.shape[-1] == _MODEL1_BYTES:
        return dequantize_mla_model1(cache)
    last = cache.shape[-1] if cache.dim() else None
    raise ValueError(f"an FP8 MLA cache has {_V32_BYTES} (V3.2) or {_MODEL1_BYTES} (MODEL1) bytes per token, "
                     f"got {last}")
