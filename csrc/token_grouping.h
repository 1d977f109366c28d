// Token grouping for expert choice (DiffMoE): the valid (expert, slot) pairs of an (E, C) choice
// table packed as contiguous rows per expert, with a tile schedule for the grouped GEMMs. One op,
// `switch_dit::group_tokens`, with a CPU and a CUDA kernel computing the same thing; sizes depend
// only on (E, C), the counts stay on the device (no host sync).
//
// Shapes (E experts, C slots per expert, R = E * C packed rows, T = ceil(R / block_m) + E tiles):
//   index (E, C) int64 token ids    valid (E, C) bool, optional (absent: every slot is valid)
//   counts (E,) int64   offsets (E + 1,) int64   (exclusive prefix sum of counts)
//   tokens, pair, row_expert (R,) int64   (token id, pair id e * C + c, expert of each packed row;
//                                          -1 past offsets[E]); rows keep slot order per expert
//   position (E, C) int64   (packed row of each pair, -1 for invalid pairs)
//   tiles (T, 2) int32      (expert, first packed row) of each block of block_m rows; -1 unused
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace switch_dit {

using GroupTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct GroupArgs {
  const int64_t* index;  // (E, C)
  const bool* valid;  // (E, C) or nullptr
  int64_t num_experts, capacity, block_m, num_tiles;
  int64_t* counts;  // (E,)
  int64_t* offsets;  // (E + 1,)
  int64_t* tokens;  // (R,)
  int64_t* pair;  // (R,)
  int64_t* row_expert;  // (R,)
  int64_t* position;  // (E, C)
  int32_t* tiles;  // (T, 2)
};

inline int64_t group_num_tiles(int64_t num_experts, int64_t capacity, int64_t block_m) {
  return (num_experts * capacity + block_m - 1) / block_m + num_experts;
}

void group_tokens_cpu_fill(const GroupArgs& a);
#if defined(SWITCH_DIT_WITH_CUDA)
void group_tokens_cuda_fill(const GroupArgs& a, const at::Tensor& like);
#endif

}  // namespace switch_dit
