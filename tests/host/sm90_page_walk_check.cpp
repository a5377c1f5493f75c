// Host check of the Hopper forward's small-pages walk (arch/sm90/fmha_fwd_sm90.cuh: PageWalk;
// tests/test_device_sources.py builds and runs it). For page sizes that are multiples of 16 (the
// box), key tiles of 64, 80 and 128, table widths from one column up and every tile start from 0
// to past the table's last page, each box's (page, row in it) must be what the per-box formula
// gives -- column = min(key / page size, last column), row = key - column * page size, the page
// the table entry of that column -- and the walk must load one table entry per column it visits
// (never more than the pages a tile touches). Prints "bad <count> checked <count>".
#include <cstdio>
#include <vector>

#include "musa/arch/sm90/fmha_fwd_sm90.cuh"

using namespace mate;
using namespace mate::device::sm90;

int main() {
  constexpr int kBox = 16;
  long long bad = 0, checked = 0;
  for (int page_size = kBox; page_size <= 256; page_size += kBox) {
    for (int key_tile : {64, 80, 128}) {
      for (int max_pages = 1; max_pages <= 9; ++max_pages) {
        // two table rows (cache_row 1 is read), distinct ids, row 0 poisoned
        std::vector<int32_t> table(2 * static_cast<size_t>(max_pages) + 3);
        for (size_t i = 0; i < table.size(); ++i) table[i] = i < static_cast<size_t>(max_pages) + 3 ? -7 : 1000 + int(i);
        FmhaParams p;
        p.page_table = table.data();
        p.page_table_batch_stride = max_pages + 3;
        p.page_size = page_size;
        p.max_pages = max_pages;
        SeqInfo s;
        s.cache_row = 1;
        const int32_t* row = table.data() + p.page_table_batch_stride;
        for (int key0 = 0; key0 <= (max_pages + 2) * page_size; key0 += key_tile) {
          PageWalk w(p, s, key0);
          int loads = 1, last_col = w.col;
          for (int c = 0; c < key_tile / kBox; ++c, w.advance(kBox)) {
            if (w.col != last_col) ++loads, last_col = w.col;
            const int key = key0 + c * kBox;
            const int col = key / page_size < max_pages - 1 ? key / page_size : max_pages - 1;
            bad += w.page != row[col] || w.row != key - col * page_size;
            ++checked;
          }
          const int first = key0 / page_size, past = (key0 + key_tile - 1) / page_size;
          const int touched = (past < max_pages - 1 ? past : max_pages - 1) - (first < max_pages - 1 ? first : max_pages - 1) + 1;
          bad += loads != touched;
        }
      }
    }
  }
  std::printf("bad %lld checked %lld\n", bad, checked);
  return 0;
}
