// Scheduler metadata of the FMHA family (get_scheduler_metadata).
// Layout, int32 (batch + 1): [0] = the split count of the call, [1 + b] = the most splits
// sequence b may use (kernels take min(that, their split count, its key blocks)).
// Its size depends only on the batch size, so the fake kernel can compute it.
#pragma once

#include <cstdint>

#include "fmha_math.h"

namespace mate {

MATE_HD int64_t scheduler_metadata_size(int64_t batch) { return batch + 1; }

// Keys one split handles at least (one key block of the kernels).
constexpr int kSplitKeyBlock = 128;
// The heuristic (num_splits = 0) leaves sequences of at most this many key blocks unsplit.
constexpr int kMinKeyBlocksToSplit = 2;

// Splits for one problem: `requested` > 0 is taken as is (capped by the key blocks),
// 0 asks the heuristic with `num_workers` parallel workers.
MATE_HD int resolve_num_splits(int requested, int64_t batch, int heads_k, int max_seqlen_q,
                               int group_size, int max_seqlen_k, int num_workers) {
  const int key_blocks = imax(1, ceil_div_pos(max_seqlen_k, kSplitKeyBlock));  // no k + 127 overflow
  if (requested > 0) return imax(1, imin(requested, key_blocks));
  // a split of one key block gains less than its merge costs (a second launch, two buffers)
  if (key_blocks <= kMinKeyBlocksToSplit) return 1;
  const int64_t rows = static_cast<int64_t>(imax(1, max_seqlen_q)) * group_size;  // GQA-packed query rows
  const int64_t units = batch * heads_k * ((rows + 127) / 128);
  return num_splits_heuristic(units, num_workers, key_blocks, 128);
}

// Splits of sequence b when a call runs `n` of them: never more than its key blocks, and
// capped by the scheduler metadata when given. Shared by the CPU and device kernels.
MATE_HD int sequence_splits(const FmhaParams& p, int b, int k_len, int n) {
  const int key_blocks = imax(1, ceil_div_pos(k_len, kSplitKeyBlock));
  int ns = imin(n, key_blocks);
  if (p.scheduler_metadata) ns = imax(1, imin(ns, p.scheduler_metadata[1 + b]));
  return ns;
}

}  // namespace mate
