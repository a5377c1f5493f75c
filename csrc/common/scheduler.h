// Scheduler metadata of the FMHA family (get_scheduler_metadata).
// Layout, int32 (batch + 1): [0] = largest split count, [1 + b] = splits of sequence b.
// Its size depends only on the batch size, so the fake kernel can compute it.
#pragma once

#include <cstdint>

#include "fmha_math.h"

namespace mate {

MATE_HD int64_t scheduler_metadata_size(int64_t batch) { return batch + 1; }

// Keys one split handles at least (one key block of the kernels).
constexpr int kSplitKeyBlock = 128;

// Splits for one problem: `requested` > 0 is taken as is (capped by the key blocks),
// 0 asks the heuristic with `num_workers` parallel workers.
MATE_HD int resolve_num_splits(int requested, int64_t batch, int heads_k, int max_seqlen_q,
                               int group_size, int max_seqlen_k, int num_workers) {
  const int key_blocks = imax(1, (max_seqlen_k + kSplitKeyBlock - 1) / kSplitKeyBlock);
  if (requested > 0) return imax(1, imin(requested, key_blocks));
  const int rows = imax(1, max_seqlen_q) * group_size;  // GQA-packed query rows
  const int64_t units = batch * heads_k * ((rows + 127) / 128);
  return num_splits_heuristic(units, num_workers, key_blocks, 128);
}

}  // namespace mate
