#pragma once
// The key order of V for the Hopper forward's fp8 P V product (fmha_fwd_sm90.cuh, kFp8), written
// once for the kernel that stages V transposed (fmha_kernels.cu), the forward that zero-fills
// parts of it and the host test that checks it against CuTe's layouts (test_device_sources.py).
//
// Why a permutation: fp8 wgmma takes its register A operand (P) in a layout that differs from the
// accumulator layout of S = Q K^T. In one 16-key group a thread's accumulators hold keys
// {2q, 2q+1, 2q+8, 2q+9} of a row (q = lane % 4), while the A operand wants keys {4q .. 4q+3} in
// those four bytes. Instead of exchanging values between lanes on every tile, V^T's keys are
// stored permuted inside every 16-key group: A column a of the group holds key fp8_pv_key(a),
// exactly the key whose score the thread has in that byte. P then packs to e4m3 straight from
// S's registers (fp8_p_source says which accumulator feeds which byte).
#include "../../../common/host_device.h"

namespace mate::device::sm90_fp8 {

// A column a (0..15) of a 16-key group -> the key stored there: a = 4q + t holds key
// 8 (t / 2) + 2 q + t % 2.
MATE_HD constexpr int fp8_pv_key(int a) { return 8 * ((a & 3) >> 1) + 2 * (a >> 2) + (a & 1); }

// The inverse: key c (0..15) of a group -> the A column that holds it.
MATE_HD constexpr int fp8_pv_column(int c) { return 4 * ((c >> 1) & 3) + 2 * (c >> 3) + (c & 1); }

// Either map applied to a key index past one group: groups keep their place.
MATE_HD constexpr int fp8_pv_position(int key) { return (key & ~15) | fp8_pv_column(key & 15); }

// Byte t (0..3) of P's register 2 jj + h (16-key group jj, row half h) comes from S's
// accumulator value fp8_p_source(jj, h, t) (CuTe's CLayout_64xN order: value e + 2 h + 4 j is
// row half h, column 8 j + 2 q + e).
MATE_HD constexpr int fp8_p_source(int jj, int h, int t) { return 8 * jj + 2 * h + 4 * (t >> 1) + (t & 1); }

}  // namespace mate::device::sm90_fp8
