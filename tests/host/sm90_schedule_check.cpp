// Host check of the Hopper forward's tile schedule (arch/sm90/fmha_fwd_sm90.cuh: make_schedule,
// work_at; tests/test_device_sources.py builds and runs it). For batches, head counts, GQA groups
// and row-block counts, and for every section size from one (sequence, head) pair to all of them,
// the schedule indices 0 .. tiles - 1 must name every (sequence, head, 128-row block) exactly once,
// a section's pairs must be whole GQA groups where make_schedule picks the size, and inside a
// section a pair's later row blocks must come first (causal tiles with late rows are the
// heaviest). Prints "bad <count> checked <count>".
#include <cstdio>
#include <vector>

#include "musa/arch/sm90/fmha_fwd_sm90.cuh"

using namespace mate;
using namespace mate::device::sm90;

// Every tile once, later row blocks of a pair first within its section; returns the errors.
static int check(const Schedule& sc, long long& checked) {
  int bad = 0;
  std::vector<int> seen(static_cast<size_t>(sc.tiles), 0);
  std::vector<int> last_m0(static_cast<size_t>(sc.pairs), 1 << 30);
  for (int64_t i = 0; i < sc.tiles; ++i) {
    const Work w = work_at(sc, i);
    const bool in_range = w.b >= 0 && w.h >= 0 && w.h < sc.heads && w.m0 >= 0 && w.m0 % 128 == 0 &&
                          w.m0 / 128 < sc.m_blocks && static_cast<int64_t>(w.b) * sc.heads + w.h < sc.pairs;
    if (!in_range) {
      ++bad;
      continue;
    }
    const int64_t pair = static_cast<int64_t>(w.b) * sc.heads + w.h;
    seen[static_cast<size_t>(pair * sc.m_blocks + w.m0 / 128)]++;
    if (w.m0 >= last_m0[static_cast<size_t>(pair)]) ++bad;  // a pair's row blocks: latest first
    last_m0[static_cast<size_t>(pair)] = w.m0;
    ++checked;
  }
  for (int s : seen) bad += s != 1;
  return bad;
}

int main() {
  using C = Config<cutlass::bfloat16_t, arch::bf16, 128, 128>;
  int bad = 0;
  long long checked = 0;
  const int batches[] = {1, 3, 8}, heads[] = {1, 4, 6}, groups[] = {1, 2}, rows[] = {1, 128, 129, 512, 1000};
  for (int b : batches)
    for (int hq : heads)
      for (int g : groups) {
        if (hq % g != 0) continue;
        for (int r : rows) {
          FmhaParams p{};
          p.batch = b;
          p.num_heads = hq;
          p.num_heads_k = hq / g;
          p.seqlen_k = r;
          p.head_dim = p.head_dim_v = 128;
          // make_schedule's own section size, for L2 sizes that hold a few pairs up to all of them
          for (int l2 : {1 << 16, 1 << 19, 1 << 22, 1 << 26}) {
            const Schedule sc = make_schedule<C>(p, r, l2);
            if (sc.pairs > g && sc.section < sc.pairs && sc.section % g != 0 && sc.section >= g) ++bad;
            bad += check(sc, checked);
          }
          // and every section size by hand (MATE_OPS_FMHA_SM90_L2_SHARE reaches one pair per section)
          Schedule sc = make_schedule<C>(p, r, 1 << 20);
          for (int64_t section = 1; section <= sc.pairs; ++section) {
            sc.section = section;
            bad += check(sc, checked);
          }
        }
      }
  std::printf("bad %d checked %lld\n", bad, checked);
  return 0;
}
