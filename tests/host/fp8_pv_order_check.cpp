// Host check of arch/sm90/fp8_pv_order.h against CuTe's wgmma layouts (tests/test_device_sources.py
// builds and runs it). For every thread of a warpgroup and every byte of P's register fragment
// (4 k-steps of 32 keys = 128 keys), the byte must hold the score of the row and key that
// fp8 wgmma multiplies it with: the A operand's row, and the key V^T stores in the A operand's
// column. Prints the number of mismatches for our order and for the identity order (which must
// fail, or the check proves nothing).
#include <cstdio>

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "musa/arch/sm90/fp8_pv_order.h"

using namespace cute;
using namespace mate::device::sm90_fp8;

template <bool kIdentity>
int mismatches() {
  constexpr int kKeys = 128;
  const auto c_layout = SM90::GMMA::CLayout_64xN<kKeys>{};  // (thread, value) -> m + 64 n
  const auto a_layout = SM90::GMMA::ALayout_64x32{};        // (thread, value) -> m + 64 k, one k-step
  int bad = 0;
  for (int thr = 0; thr < 128; ++thr)
    for (int ks = 0; ks < kKeys / 32; ++ks)
      for (int v = 0; v < 16; ++v) {
        const int a = a_layout(thr, v);
        const int m_a = a % 64, col = 32 * ks + a / 64;  // A operand row and column
        // the key V^T holds in that column
        const int key = kIdentity ? col : (col & ~15) | fp8_pv_key(col & 15);
        // the accumulator the kernel packs into this byte: register 2 jj + h, byte t
        const int reg = 4 * ks + v / 4, t = v % 4, jj = reg / 2, h = reg % 2;
        const int c = c_layout(thr, fp8_p_source(jj, h, t));
        const int m_c = c % 64, n_c = c / 64;
        if (m_c != m_a || n_c != key) ++bad;
      }
  return bad;
}

int main() {
  int inverse_bad = 0;  // fp8_pv_column undoes fp8_pv_key, both ways
  for (int c = 0; c < 16; ++c)
    if (fp8_pv_key(fp8_pv_column(c)) != c || fp8_pv_column(fp8_pv_key(c)) != c) ++inverse_bad;
  std::printf("order %d identity %d inverse %d\n", mismatches<false>(), mismatches<true>(), inverse_bad);
  return 0;
}
