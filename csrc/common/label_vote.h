// Majority vote of a label cell with ties going to the lowest class id (ops.md section 7).
//
// Slot C stands for ignore, so it ranks after every class. The vote is kept online: after each
// increment `best` is the lowest id among the slots with the highest count, an invariant kept by
// comparing only the slot just incremented with the current best.
#pragma once

#include "common/macros.h"

namespace fastuda {

template <typename Count>
FASTUDA_HD inline void vote_add(Count* counts, int slot, int& best, Count& best_count) {
  const Count c = ++counts[slot];
  if (c > best_count || (c == best_count && slot < best)) {
    best = slot;
    best_count = c;
  }
}

// The cell's output: the winning class, or ignore_index when the winner is ignore (slot
// num_classes) or covers less than min_ratio of the cell's area (compared in fp32, like the
// reference's average-pooled one-hot).
FASTUDA_HD inline long long vote_result(int best, int best_count, int cell_area, int num_classes,
                                        float min_ratio, long long ignore_index) {
  const float ratio = static_cast<float>(best_count) / static_cast<float>(cell_area);
  if (best == num_classes || ratio < min_ratio) return ignore_index;
  return best;
}

}  // namespace fastuda
