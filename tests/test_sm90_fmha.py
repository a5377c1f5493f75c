"""The Hopper FMHA forward (csrc/musa/arch/sm90/fmha_fwd_sm90.cuh: TMA + wgmma) against the fp64
oracle, on random inputs with poisoned outputs.

By default the forward takes the sm90 kernel on compute capability 9.0 for calls with at least
128 query rows; with MATE_OPS_FMHA_PATH=sm90 for every call it serves (the short cases here
need that). The variable is read once per process, so the checks run in a child process with it
set, and this file is the child's script too (tests/sm90_child.py holds the harness of both sides):

    python tests/test_sm90_fmha.py --device cuda [--only NAME ...] [--list]

Each case runs torch.ops.mate.fmha_fwd and fmha_fwd_out (into NaN-poisoned out and lse) and
compares both with the oracle by FA3's rule (tests/test_fmha.py's check); on CUDA it also asks
the profiler which kernel ran, so a case the sm90 kernel declined (fmha_sm90_fits false) fails
instead of passing on the mma.sync path. ``--device cpu`` runs the same comparisons against the
CPU op (a dry run of this harness; no environment variable matters there). The fp8 cases
(e4m3 inputs with descales, bf16 out) also check which staging kernel of launch.cpp ran: the V
transpose for the fp8 wgmma kernels (D and Dv multiples of 16 at tile widths 128 and 256), the
fp8-to-bf16 conversion for the others (fp8_route).

The kernel is persistent (one block per SM looping over work tiles). A second child reruns a
subset (ONE_BLOCK_CASES) with MATE_OPS_FMHA_SM90_BLOCKS=1, a grid of one block, so that every
tile boundary of those calls is crossed by the same pipeline state, and with schedule sections of
one (sequence, head) pair (MATE_OPS_FMHA_SM90_L2_SHARE), and with O rescaled on every growth of a
row maximum (MATE_OPS_FMHA_SM90_RESCALE_SLACK=0; by default only past 2^8). A third reruns the 16-bit width-256
cases with their 80-key tiles forced (MATE_OPS_FMHA_SM90_SHORT_KEYS=1; by default calls of at
most 1024 keys take the 64-key tiles).

Skipped without a compute capability 9.0 GPU or without the sm90 kernels in the build.
"""
import random
import sys
import zlib

import pytest
import torch

import sm90_child

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = torch.float8_e4m3fn  # out is bf16
SM90_KERNEL = "fmha_sm90_kernel"
FP8_STAGE_KERNEL = "fp8_to_bf16_kernel"  # fp8 staged to bf16 for the 16-bit kernels
FP8_VT_KERNEL = "fp8_v_transpose_kernel"  # V^T staged for the fp8 wgmma kernels
MARK = "@@sm90-case "  # result lines of the child: MARK + json


# ---------------------------------------------------------------- cases --------------------
# A case is a dict of plain values (its name is the pytest id and the --only key); build()
# turns it into tensors. Lengths cross the 128-row / 128-key tile edges (1, 127, 129, 300, 1000);
# width 256 takes 64-key tiles for calls of at most 1024 keys and 80-key tiles for longer ones
# (a third child reruns its 16-bit cases with the 80-key tiles forced: LONG_TILE_CASES).

def _cases():
    cases = []

    def add(name, **spec):
        spec.setdefault("d", 128)
        spec.setdefault("dtype", "bf16")
        spec.setdefault("h", 4)
        spec.setdefault("hk", 2)
        spec.setdefault("b", 2)
        cases.append(dict(name=name, **spec))

    for d in (128, 64):
        for dt in DTYPES:
            for causal in (False, True):
                for sq, sk in ((1, 1), (127, 129), (129, 127), (300, 1000), (1000, 300)):
                    add(f"dense-d{d}-{dt}-{'causal' if causal else 'full'}-{sq}x{sk}", layout="dense", d=d,
                        dtype=dt, causal=causal, sq=sq, sk=sk)
    # D 256 (80-key tiles; lengths 63 / 65 cross the 64-key tiles of an earlier version)
    for dt in DTYPES:
        for causal in (False, True):
            for sq, sk in ((127, 65), (129, 63), (300, 1000)):
                add(f"dense-d256-{dt}-{'causal' if causal else 'full'}-{sq}x{sk}", layout="dense", d=256, dtype=dt,
                    causal=causal, sq=sq, sk=sk)
    for causal in (False, True):
        add(f"ragged-d256-bf16-{'causal' if causal else 'full'}", layout="ragged", d=256, causal=causal,
            lq=[1, 127, 129, 300, 0], lk=[5, 65, 63, 1000, 3])
    add("window-d256-100_50-sink", layout="dense", d=256, sq=300, sk=700, window=(100, 50), sink=True)
    add("long-d256-bf16-full-1500", layout="dense", d=256, sq=200, sk=1500)  # past 1024 keys: 80-key tiles
    # head dims between the tile widths pad up inside the kernel (TMA reads the missing
    # channels as zeros; the padding channels of out are never stored); D != Dv
    for d, dv in ((96, 96), (80, 80), (40, 72), (8, 8), (192, 128), (160, 96), (200, 256)):
        for causal in (False, True):
            add(f"widths-d{d}x{dv}-{'causal' if causal else 'full'}", layout="dense", d=d, dv=dv, sq=129, sk=300,
                causal=causal)
    add("widths-d192x128-ragged-fp16", layout="ragged", d=192, dv=128, dtype="fp16", causal=True,
        lq=[1, 127, 129, 300], lk=[5, 129, 127, 1000])
    for d in (128, 64):
        for window in ((64, 0), (100, 50), (0, 0), (-1, 7), (300, -1)):
            add(f"window-d{d}-{window[0]}_{window[1]}", layout="dense", d=d, sq=300, sk=1000, window=window)
    for chunk, window, causal in ((128, (-1, -1), True), (96, (50, 50), False), (200, (-1, -1), False)):
        add(f"chunk-{chunk}-{window[0]}_{window[1]}-{'causal' if causal else 'full'}", layout="dense", sq=700,
            sk=700, chunk=chunk, window=window, causal=causal)
    for causal in (False, True):
        add(f"seqused-{'causal' if causal else 'full'}", layout="dense", b=3, sq=300, sk=1000, causal=causal,
            seqused_q=[300, 7, 0], seqused_k=[1000, 129, 1])
    for d in (128, 64):
        for dt in DTYPES:
            for causal in (False, True):
                add(f"ragged-d{d}-{dt}-{'causal' if causal else 'full'}", layout="ragged", d=d, dtype=dt,
                    causal=causal, lq=[1, 127, 129, 300, 0, 1000], lk=[5, 129, 127, 1000, 3, 300])
    add("ragged-seqused_k-past-segment", layout="ragged", lq=[3, 130], lk=[5, 200], seqused_k=[150, 2])
    add("ragged-q-dense-k", layout="ragged_q", lq=[4, 129, 1], sk=300, seqused_k=[300, 20, 3], causal=True)
    add("dense-q-ragged-k", layout="ragged_k", b=3, sq=129, lk=[1, 300, 128], causal=True)
    for h, hk in ((8, 1), (6, 3), (2, 2)):
        add(f"gqa-{h}x{hk}", layout="dense", h=h, hk=hk, sq=300, sk=700, causal=True)
    for causal in (False, True):
        add(f"sink-{'causal' if causal else 'full'}", layout="dense", sq=300, sk=129, causal=causal, sink=True)
    add("sink-ragged-causal", layout="ragged", lq=[300, 5, 129], lk=[129, 0, 300], causal=True, sink=True)
    add("cache-batch-idx-leftpad", layout="cache", b=3, sq=129, sk=300, cache_rows=5, cache_batch_idx=[4, 0, 2],
        seqused_k=[300, 10, 200], leftpad=[5, 10, 0], window=(100, 0))
    add("qkv-packed-strided", layout="packed", h=4, hk=4, sq=300, sk=300, causal=True)
    add("softmax-scale", layout="dense", sq=129, sk=300, scale=0.3)
    # the ScoreMod instantiation: softcap, ALiBi, a negative scale
    add("softcap-causal", layout="dense", sq=300, sk=300, causal=True, softcap=5.0)
    add("softcap-d256-ragged", layout="ragged", d=256, lq=[1, 129, 300], lk=[65, 300, 129], softcap=8.0)
    add("alibi-causal-sq-gt-sk", layout="dense", sq=300, sk=129, causal=True, alibi=True)
    add("alibi-window-sink-gqa", layout="dense", h=8, hk=2, sq=300, sk=700, window=(100, 20), alibi=True, sink=True)
    add("softcap-alibi-d192x128", layout="dense", d=192, dv=128, sq=129, sk=300, softcap=6.0, alibi=True)
    add("negative-scale", layout="dense", sq=129, sk=300, scale=-0.2)
    add("fp16-d64-gqa-window", layout="dense", d=64, dtype="fp16", h=8, hk=2, sq=1000, sk=1000, window=(200, 0))
    # The kernel is persistent (one block per SM looping over work tiles; the K / V pipeline's
    # phases, Q's full/empty pair and the ping-pong barriers run on from tile to tile). These
    # have far more work tiles than an H200 has SMs, of mixed weights, so blocks cross many
    # tile boundaries with every kind of neighbour: long and short sequences, tiles with no
    # keys at all, tiles where one consumer warpgroup has keys and the other none, padded rows.
    rng = random.Random(20240611)
    lq40 = [rng.randint(1, 700) for _ in range(40)]
    lk40 = [rng.randint(1, 700) for _ in range(40)]
    for causal in (False, True):
        add(f"persist-ragged40-gqa-{'causal' if causal else 'full'}", layout="ragged", h=8, hk=2, causal=causal,
            lq=lq40, lk=lq40 if causal else lk40)
    add("persist-ragged40-d64-fp16-causal-mixed-k", layout="ragged", d=64, dtype="fp16", h=6, hk=3, causal=True,
        lq=lq40, lk=lk40)
    add("persist-ragged40-d256-causal", layout="ragged", d=256, h=4, hk=1, causal=True, lq=lq40[:24],
        lk=lk40[:24])  # 80-key tiles: the last V tile's zero fill at most boundaries
    add("persist-ragged40-softcap-alibi-sink", layout="ragged", h=4, hk=2, causal=True, lq=lq40, lk=lk40,
        softcap=7.0, alibi=True, sink=True)  # the ScoreMod instantiation
    # seqused_k 0 (a sequence with no keys: tiles with no loads between tiles with loads);
    # 140 and 7 keys under a bottom-right window: tiles whose first warpgroup has no keys and
    # whose second has some; seqused_q pads rows (out 0, lse -inf) in some of the tiles
    add("persist-window-seqused-k-empty", layout="dense", b=4, h=8, hk=2, sq=1000, sk=1000, window=(100, 0),
        seqused_k=[140, 0, 1000, 7])
    add("persist-causal-seqused-qk", layout="dense", b=4, h=8, hk=2, sq=1000, sk=1000, causal=True,
        seqused_q=[1000, 500, 0, 999], seqused_k=[140, 0, 1000, 7], sink=True)
    # paged K / V (page sizes a multiple of the key tile: 128, or 80 at D 256), pages shuffled,
    # every unused slot NaN; tiles start page-aligned, so a first tile can hold keys no row
    # sees (left padding poisoned with NaN here: its V rows must be zeroed, not multiplied by 0)
    add("paged-128-causal", layout="paged", b=3, sq=300, lens=[700, 129, 1], page=128, causal=True)
    add("paged-256-gqa-full", layout="paged", h=8, hk=2, sq=200, lens=[300, 513, 64], page=256)
    add("paged-128-window-leftpad-nan", layout="paged", b=3, sq=150, lens=[700, 300, 140], page=128,
        window=(100, 0), leftpad=[5, 130, 0])
    add("paged-128-d64-fp16-cache-batch-idx", layout="paged", d=64, dtype="fp16", b=3, sq=129, lens=[200, 77, 400],
        page=128, causal=True, cache_batch_idx=True)
    add("paged-128-d256-causal", layout="paged", d=256, b=2, sq=200, lens=[300, 500], page=128, causal=True)
    add("paged-160-d256-causal-sink", layout="paged", d=256, b=2, sq=300, lens=[310, 650], page=160, causal=True,
        sink=True)
    add("paged-256-d192x128-ragged-q", layout="paged", d=192, dv=128, lq=[129, 1, 300], lens=[400, 7, 300],
        page=256, causal=True)
    add("paged-128-softcap-alibi", layout="paged", b=2, sq=200, lens=[333, 257], page=128, softcap=6.0, alibi=True)
    # one tile holding both a NaN head (keys 128, 129: padding) and a NaN tail (past the last key)
    add("paged-128-one-tile-nan-head-and-tail", layout="paged", b=1, sq=150, lens=[200], page=128, leftpad=[130])
    # the ScoreMod instantiation with keys before the first (negative relative key indices)
    add("paged-128-softcap-alibi-leftpad-nan", layout="paged", b=2, sq=200, lens=[333, 300], page=128, softcap=6.0,
        alibi=True, leftpad=[130, 5], causal=True)
    add("paged-160-d256-leftpad-nan", layout="paged", d=256, b=2, sq=150, lens=[300, 400], page=160,
        leftpad=[37, 100])
    add("paged-128-cache-batch-idx-leftpad-nan", layout="paged", b=3, sq=129, lens=[300, 200, 400], page=128,
        cache_batch_idx=True, leftpad=[130, 0, 250], causal=True)
    # pages that do not hold whole key tiles (16, 32, 48, 64 keys): a tile arrives as 16-key boxes,
    # one page lookup each; boxes past a sequence's last page read nothing (zeros); table columns
    # past a sequence's pages set to -1 (tail): out-of-bounds boxes
    add("paged-16-causal-gqa", layout="paged", b=3, h=8, hk=2, sq=300, lens=[700, 129, 1], page=16, causal=True)
    add("paged-32-d64-fp16-leftpad-nan", layout="paged", d=64, dtype="fp16", b=2, sq=150, lens=[300, 77], page=32,
        leftpad=[37, 5])
    add("paged-64-window-cache-batch-idx-leftpad-nan", layout="paged", b=3, sq=129, lens=[300, 200, 400], page=64,
        window=(100, 0), cache_batch_idx=True, leftpad=[130, 0, 250])
    add("paged-16-d256-causal-sink", layout="paged", d=256, b=2, sq=300, lens=[310, 650], page=16, causal=True,
        sink=True)
    add("paged-16-d256-long", layout="paged", d=256, b=1, sq=200, lens=[1500], page=16)
    add("paged-32-d192x128-ragged-q", layout="paged", d=192, dv=128, lq=[129, 1, 300], lens=[400, 7, 300], page=32,
        causal=True)
    add("paged-16-softcap-alibi-leftpad-nan", layout="paged", b=2, sq=200, lens=[333, 300], page=16, softcap=6.0,
        alibi=True, leftpad=[130, 5], causal=True)
    add("paged-48-causal-tail-minus-one", layout="paged", b=3, sq=200, lens=[333, 100, 7], page=48, causal=True,
        tail=-1)
    # pages longer than a key tile that do not hold whole tiles: boxes too (the box descriptors
    # must exist whenever the kernel uses them); width 256's short tiles at 208-key pages
    add("paged-192-causal", layout="paged", b=2, sq=200, lens=[700, 333], page=192, causal=True)
    add("paged-208-d256-causal", layout="paged", d=256, b=2, sq=150, lens=[900, 250], page=208, causal=True)
    add("paged-32-d256-long-tail-minus-one", layout="paged", d=256, b=2, sq=150, lens=[1500, 200], page=32, tail=-1)
    # fp8 e4m3 on fp8 wgmma (V staged transposed) or converted to bf16 first (fp8_route), the
    # descales (per batch and kv head) applied inside the kernel -- q's and k's to the logits,
    # v's to the output
    for causal in (False, True):
        c = "causal" if causal else "full"
        add(f"fp8-d128-descale-{c}", dtype="fp8", layout="dense", sq=300, sk=1000, causal=causal, descale=True)
        add(f"fp8-d256-descale-{c}", dtype="fp8", layout="dense", d=256, sq=129, sk=300, causal=causal,
            descale=True)
    add("fp8-d64-no-descale", dtype="fp8", layout="dense", d=64, sq=129, sk=127)
    add("fp8-d192x128-descale-causal", dtype="fp8", layout="dense", d=192, dv=128, sq=300, sk=300, causal=True,
        descale=True)
    # descales that kPlain cannot fold into exp2's scale: negative and zero (every score first
    # multiplied), beside positive ones in the same call
    add("fp8-mixed-sign-descale-gqa", dtype="fp8", layout="dense", b=3, h=8, hk=2, sq=200, sk=300, causal=True,
        descale="mixed")
    add("fp8-d72-v-descale-only", dtype="fp8", layout="dense", d=72, sq=200, sk=333, descale="v")
    add("fp8-ragged-gqa-descale-causal", dtype="fp8", layout="ragged", h=8, hk=2, lq=[1, 129, 300], lk=[65, 300, 129],
        causal=True, descale=True)
    add("fp8-softcap-window-sink-descale", dtype="fp8", layout="dense", sq=300, sk=700, window=(100, 20),
        softcap=5.0, sink=True, descale=True)
    add("fp8-seqused-k-descale-causal", dtype="fp8", layout="dense", b=3, sq=129, sk=300, seqused_k=[300, 10, 200],
        causal=True, descale=True)
    # fp8 wgmma: a head dim padded inside the 128 tile, ragged keys whose sequences start off the
    # 16-key groups of the staged V^T, Dv narrower than D, and a long row (P's e4m3 range)
    add("fp8-d96-full", dtype="fp8", layout="dense", d=96, sq=200, sk=333, descale=True)
    add("fp8-ragged-window-descale", dtype="fp8", layout="ragged", lq=[129, 7, 300], lk=[37, 211, 300],
        window=(50, 30), descale=True)
    add("fp8-d256x128-causal", dtype="fp8", layout="dense", d=256, dv=128, sq=300, sk=300, causal=True)
    add("fp8-d256-softcap-descale", dtype="fp8", layout="dense", d=256, sq=200, sk=333, softcap=4.0,
        descale=True)  # ScoreMod at D 256: the 64-key fp8 tiles
    add("fp8-leftpad-seqused-causal", dtype="fp8", layout="dense", b=3, sq=129, sk=400, seqused_k=[400, 150, 333],
        leftpad=[5, 0, 37], causal=True, descale=True)
    add("fp8-d128-long-descale", dtype="fp8", layout="dense", b=1, sq=256, sk=4000, descale=True)
    return cases


CASES = _cases()
CASE_NAMES = [c["name"] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES)


def _cu(lengths):
    from mate_ops import testing as T
    return T.random_cu_seqlens(lengths)


def _i32(xs):
    return torch.tensor(xs, dtype=torch.int32)


def build(spec):
    """(q, k, v, op kwargs, oracle kwargs) of a case, on the CPU."""
    torch.manual_seed(zlib.crc32(spec["name"].encode()))
    dt, d, h, hk, b = dict(DTYPES, fp8=FP8)[spec["dtype"]], spec["d"], spec["h"], spec["hk"], spec["b"]
    dv = spec.get("dv", d)
    if dt == FP8:
        rand = lambda *shape: (torch.randn(*shape) * 2).to(FP8)  # noqa: E731
    else:
        rand = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    kw = {}
    layout = spec["layout"]
    if layout == "dense":
        q, k, v = rand(b, spec["sq"], h, d), rand(b, spec["sk"], hk, d), rand(b, spec["sk"], hk, dv)
    elif layout == "ragged":
        lq, lk = spec["lq"], spec["lk"]
        q, k, v = rand(sum(lq), h, d), rand(sum(lk), hk, d), rand(sum(lk), hk, dv)
        kw.update(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    elif layout == "ragged_q":
        lq = spec["lq"]
        q, k, v = rand(sum(lq), h, d), rand(len(lq), spec["sk"], hk, d), rand(len(lq), spec["sk"], hk, d)
        kw.update(cu_seqlens_q=_cu(lq), max_seqlen_q=max(lq))
    elif layout == "ragged_k":
        lk = spec["lk"]
        q, k, v = rand(b, spec["sq"], h, d), rand(sum(lk), hk, d), rand(sum(lk), hk, d)
        kw.update(cu_seqlens_k=_cu(lk), max_seqlen_k=max(lk))
    elif layout == "cache":
        q = rand(b, spec["sq"], h, d)
        k, v = rand(spec["cache_rows"], spec["sk"], hk, d), rand(spec["cache_rows"], spec["sk"], hk, d)
        kw.update(cache_batch_idx=_i32(spec["cache_batch_idx"]), cache_leftpad=_i32(spec["leftpad"]))
    elif layout == "paged":  # dense q (or ragged with lq), K / V scattered into a shuffled page pool
        from mate_ops import testing as T
        lens = spec["lens"]
        b = len(lens)
        if "lq" in spec:
            q = rand(sum(spec["lq"]), h, d)
            kw.update(cu_seqlens_q=_cu(spec["lq"]), max_seqlen_q=max(spec["lq"]))
        else:
            q = rand(b, spec["sq"], h, d)
        kd, vd = rand(b, max(lens), hk, d), rand(b, max(lens), hk, dv)
        k, v, table = T.make_paged_kv(kd, vd, lens, spec["page"])
        page = spec["page"]
        if "tail" in spec:  # the table columns past each sequence's pages (never read for keys)
            for i, n in enumerate(lens):
                table[i, -(-n // page):] = spec["tail"]
        for i, pad in enumerate(spec.get("leftpad", [])):  # left padding holds garbage
            for j in range(pad):
                k[table[i, j // page], j % page] = float("nan")
                v[table[i, j // page], j % page] = float("nan")
        if spec.get("cache_batch_idx"):  # a table of 2b rows: sequence i's pages in row b + i and b - 1 - i
            table = torch.cat([table.flip(0), table])
            kw["cache_batch_idx"] = _i32([b - 1 - i if i % 2 else b + i for i in range(b)])
        kw.update(page_table=table, seqused_k=_i32(lens))
        if "leftpad" in spec:
            kw["cache_leftpad"] = _i32(spec["leftpad"])
    elif layout == "packed":  # q, k, v as strided views of one (B, S, 3, H, D) tensor
        qkv = rand(b, spec["sq"], 3, h, d)
        q, k, v = qkv.unbind(2)
    else:
        raise ValueError(layout)
    if layout == "dense" and "leftpad" in spec:  # cache_leftpad without cache_batch_idx
        kw["cache_leftpad"] = _i32(spec["leftpad"])
    if "seqused_q" in spec:
        kw["seqused_q"] = _i32(spec["seqused_q"])
    if "seqused_k" in spec:
        kw["seqused_k"] = _i32(spec["seqused_k"])
    if spec.get("sink"):
        kw["learnable_sink"] = torch.randn(h, dtype=torch.float32) * 2
    if "scale" in spec:
        kw["softmax_scale"] = spec["scale"]
    if "softcap" in spec:
        kw["softcap"] = spec["softcap"]
    if spec.get("alibi"):
        kw["alibi_slopes"] = torch.rand(h, dtype=torch.float32) * 0.3
    if spec.get("descale"):  # (B, Hk) fp32; True / "mixed": all three, "v": v_descale alone
        batch = len(spec["lq"]) if "lq" in spec else b
        for name in ("v",) if spec["descale"] == "v" else ("q", "k", "v"):
            kw[f"{name}_descale"] = torch.rand(batch, hk) + 0.5
        if spec["descale"] == "mixed":  # q * k descale products < 0 and = 0 for two (batch, kv head)
            kw["k_descale"][0, 0] *= -1
            kw["q_descale"][batch - 1, hk - 1] = 0.0
    causal, window, chunk = spec.get("causal", False), spec.get("window", (-1, -1)), spec.get("chunk", 0)
    ref_kw = {key: val for key, val in kw.items() if key not in ("max_seqlen_q", "max_seqlen_k")}
    ref_kw.update(causal=causal, window_size=tuple(window), attention_chunk=chunk)
    op_kw = dict(kw, causal=causal, window_size_left=window[0], window_size_right=window[1],
                 attention_chunk=chunk, num_splits=1)  # splits take the mma.sync path
    return q, k, v, op_kw, ref_kw


def fp8_route(spec):
    """The staging kernel an fp8 case must show: the V transpose of the fp8 wgmma kernels (D and Dv
    multiples of 16, tile width 128 or 256: fmha_fwd_sm90.cu), else the bf16 conversion."""
    d, dv = spec["d"], spec.get("dv", spec["d"])
    width_128_or_256 = not (d <= 64 and dv <= 64) and not (128 < d <= 192 and dv <= 128)
    return FP8_VT_KERNEL if d % 16 == 0 and dv % 16 == 0 and width_128_or_256 else FP8_STAGE_KERNEL


def run_case(spec, device):
    """Compare the op on `device` with the oracle; raises AssertionError on a mismatch.
    Returns the kernel route seen: "sm90", "other" or "unknown" (no profiler data)."""
    from mate_ops import testing as T
    q, k, v, op_kw, ref_kw = build(spec)
    out_ref, lse_ref = T.fmha_ref(q, k, v, **ref_kw)
    out_low, _ = T.fmha_ref(q, k, v, compute_dtype=q.dtype, **ref_kw)

    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = {key: dev(val) for key, val in op_kw.items()}
    if spec["layout"] == "packed":  # keep the strided views on the device
        qkv = torch.stack([q, k, v], dim=2).to(device)
        qd, kd, vd = qkv.unbind(2)
        assert qd.stride(1) == 3 * q.shape[2] * q.shape[3]
    else:
        qd, kd, vd = dev(q), dev(k), dev(v)
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    results = [torch.ops.mate.fmha_fwd(qd, kd, vd, **args)]
    out_buf = T.poison_(torch.empty(out_ref.shape, dtype=out_dtype, device=device))
    lse_buf = T.poison_(torch.empty(lse_ref.shape, dtype=torch.float32, device=device))
    torch.ops.mate.fmha_fwd_out(qd, kd, vd, out_buf, lse_buf, **args)
    results.append((out_buf, lse_buf))
    for which, (out, lse) in zip(("fmha_fwd", "fmha_fwd_out"), results):
        assert out.dtype == out_dtype and out.shape == out_ref.shape, f"{which}: out {out.dtype} {tuple(out.shape)}"
        T.assert_close_fa3(out, out_ref, out_low, input_dtype=q.dtype, name=f"{which} out")
        T.assert_lse_close(lse, lse_ref, input_dtype=q.dtype, name=f"{which} lse")
    kernels = [SM90_KERNEL, fp8_route(spec)] if q.dtype == FP8 else [SM90_KERNEL]
    return sm90_child.route_seen(lambda: torch.ops.mate.fmha_fwd(qd, kd, vd, **args), device, kernels)


# ---------------------------------------------------------------- pytest side -------------

# only the pytest side skips: the script runs wherever it is pointed (--device cpu included)
_SKIP = sm90_child.skip_reason("mate::fmha_fwd", [SM90_KERNEL], "sm90 kernels") if __name__ != "__main__" else None
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

ROUTE_ENV = {"MATE_OPS_FMHA_PATH": "sm90"}
# every case, in one child run
sm90_results = sm90_child.child_results_fixture(__file__, MARK, ROUTE_ENV)


# The same kernel on a grid of one block (MATE_OPS_FMHA_SM90_BLOCKS=1): every work tile of the
# call runs on one SM, one after the other, so every tile boundary of these cases is crossed by
# the same pipeline state (barrier phases, the Q buffer, the ping-pong barriers, the tile ring,
# V's zero warp); with sections of one (sequence, head) pair (MATE_OPS_FMHA_SM90_L2_SHARE), the
# schedule's other extreme; and the rescale without slack (O rescaled on every growth of a row
# maximum, the default's other extreme).
ONE_BLOCK_CASES = [n for n in CASE_NAMES if n.startswith(("persist-", "seqused-", "chunk-"))] + [
    "ragged-d128-bf16-causal", "ragged-d256-bf16-causal", "ragged-d64-fp16-full", "window-d128-100_50",
    "window-d64--1_7", "sink-ragged-causal", "cache-batch-idx-leftpad", "alibi-window-sink-gqa",
    "widths-d200x256-causal", "widths-d192x128-ragged-fp16", "ragged-seqused_k-past-segment",
    "fp8-ragged-gqa-descale-causal", "fp8-ragged-window-descale", "paged-128-window-leftpad-nan", "paged-160-d256-causal-sink",
    "paged-128-one-tile-nan-head-and-tail", "paged-16-causal-gqa", "paged-16-d256-causal-sink"]
assert set(ONE_BLOCK_CASES) <= set(CASE_NAMES)
sm90_one_block_results = sm90_child.child_results_fixture(
    __file__, MARK, dict(ROUTE_ENV, MATE_OPS_FMHA_SM90_BLOCKS="1", MATE_OPS_FMHA_SM90_L2_SHARE="1000000",
                         MATE_OPS_FMHA_SM90_RESCALE_SLACK="0"),
    ONE_BLOCK_CASES)


# Width 256's 80-key tiles on the 16-bit width-256 cases, most of which are short enough for the
# 64-key tiles by default (MATE_OPS_FMHA_SM90_SHORT_KEYS=1: every call takes the 80-key tiles).
def _width_256(spec):
    d, dv = spec["d"], spec.get("dv", spec["d"])
    return not (d <= 128 and dv <= 128) and not (128 < d <= 192 and dv <= 128)


def _pages_fit_80(page):  # whole 80-key tiles per page, or 16-key boxes
    return page % 80 == 0 or page % 16 == 0


LONG_TILE_CASES = [c["name"] for c in CASES if c["dtype"] != "fp8" and _width_256(c) and _pages_fit_80(c.get("page", 80))]
sm90_long_tile_results = sm90_child.child_results_fixture(
    __file__, MARK, dict(ROUTE_ENV, MATE_OPS_FMHA_SM90_SHORT_KEYS="1"), LONG_TILE_CASES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sm90_case(sm90_results, name):
    res = sm90_child.case_result(sm90_results, name)
    assert res["ok"], res["error"]
    assert res["route"] != "other", f"{name}: the forward did not run {SM90_KERNEL} (fmha_sm90_fits declined it?)"


def test_sm90_child_exit(sm90_results):
    results, proc = sm90_results
    assert proc.returncode == 0 or any(not r["ok"] for r in results.values()), proc.stderr[-3000:]


@pytest.mark.parametrize("name", ONE_BLOCK_CASES)
def test_sm90_one_block_case(sm90_one_block_results, name):
    test_sm90_case(sm90_one_block_results, name)


def test_sm90_one_block_child_exit(sm90_one_block_results):
    test_sm90_child_exit(sm90_one_block_results)


@pytest.mark.parametrize("name", LONG_TILE_CASES)
def test_sm90_long_tile_case(sm90_long_tile_results, name):
    test_sm90_case(sm90_long_tile_results, name)


def test_sm90_long_tile_child_exit(sm90_long_tile_results):
    test_sm90_child_exit(sm90_long_tile_results)


if __name__ == "__main__":
    sys.exit(sm90_child.main(CASES, run_case, MARK, __doc__.splitlines()[0]))
