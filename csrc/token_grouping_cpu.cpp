// CPU kernel of switch_dit::group_tokens: one pass to count, one to place (see token_grouping.h).
#include <algorithm>

#include "token_grouping.h"

namespace switch_dit {

void group_tokens_cpu_fill(const GroupArgs& a) {
  const int64_t E = a.num_experts, C = a.capacity, R = E * C, bm = a.block_m;
  a.offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t c = 0; c < C; ++c) n += a.valid == nullptr || a.valid[e * C + c];
    a.counts[e] = n;
    a.offsets[e + 1] = a.offsets[e] + n;
  }
  std::fill(a.tokens, a.tokens + R, -1);
  std::fill(a.pair, a.pair + R, -1);
  std::fill(a.row_expert, a.row_expert + R, -1);
  std::fill(a.tiles, a.tiles + 2 * a.num_tiles, -1);
  int64_t tile = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t r = a.offsets[e];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t p = e * C + c;
      if (a.valid != nullptr && !a.valid[p]) {
        a.position[p] = -1;
        continue;
      }
      a.position[p] = r;
      a.tokens[r] = a.index[p];
      a.pair[r] = p;
      a.row_expert[r] = e;
      ++r;
    }
    for (int64_t first = a.offsets[e]; first < a.offsets[e + 1]; first += bm, ++tile) {
      a.tiles[2 * tile] = static_cast<int32_t>(e);
      a.tiles[2 * tile + 1] = static_cast<int32_t>(first);
    }
  }
}

}  // namespace switch_dit
