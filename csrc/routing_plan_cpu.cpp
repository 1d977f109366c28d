// CPU kernel of switch_dit::routing_plan: per block, selection top-k and a counting sort of the
// (sample, slot) pairs by expert. Blocks are independent and run in parallel.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "routing_plan.h"

namespace switch_dit {
namespace {

template <typename scalar_t>
void plan_one_block(const PlanArgs<scalar_t>& a, int64_t n, std::vector<int64_t>& fill) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int M = a.num_experts, B = a.batch, k = a.top_k;
  const int64_t P = static_cast<int64_t>(B) * k;
  int64_t* idx = a.topk_idx + n * P;
  scalar_t* w = a.topk_w + n * P;
  int64_t* counts = a.counts + n * M;
  int64_t* offsets = a.offsets + n * (M + 1);
  int64_t* order = a.order + n * P;
  int64_t* position = a.position + n * P;

  // Timesteps were range-checked by the binding: every sample is valid here.
  std::fill(counts, counts + M, 0);
  for (int b = 0; b < B; ++b) {
    const scalar_t* row = a.probs + (n * a.num_timesteps + a.timesteps[b]) * M;
    select_topk<scalar_t, acc_t>(row, M, k, idx + int64_t(b) * k, w + int64_t(b) * k);
    for (int s = 0; s < k; ++s) ++counts[idx[int64_t(b) * k + s]];
  }
  offsets[0] = 0;
  for (int e = 0; e < M; ++e) offsets[e + 1] = offsets[e] + counts[e];

  // Walking pairs in (sample, slot) order makes the sort stable: ascending sample per expert.
  std::copy(offsets, offsets + M, fill.begin());
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r = fill[idx[p]]++;
    order[r] = p;
    position[p] = r;
  }

  const int64_t nlt = a.token_blocks;
  int32_t* tiles = a.tiles + n * P * nlt * kTileColumns;
  for (int64_t r = 0; r < P; ++r) {
    const int64_t p = order[r];
    for (int64_t j = 0; j < nlt; ++j) {
      int32_t* t = tiles + (r * nlt + j) * kTileColumns;
      t[kTileBlock] = static_cast<int32_t>(n);
      t[kTileExpert] = static_cast<int32_t>(idx[p]);
      t[kTileSample] = static_cast<int32_t>(p / k);
      t[kTileToken] = static_cast<int32_t>(j * a.block_l);
    }
  }
}

}  // namespace

void routing_plan_cpu_fill(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                           int64_t top_k, int64_t token_blocks, int64_t block_l,
                           const PlanTensors& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_probs.scalar_type(),
                                  "routing_plan_cpu", [&] {
    PlanArgs<scalar_t> a{gate_probs.const_data_ptr<scalar_t>(),
                         timesteps.const_data_ptr<int64_t>(),
                         gate_probs.size(0),
                         gate_probs.size(1),
                         static_cast<int>(gate_probs.size(2)),
                         static_cast<int>(timesteps.size(0)),
                         static_cast<int>(top_k),
                         static_cast<int>(token_blocks),
                         static_cast<int>(block_l),
                         std::get<0>(out).data_ptr<int64_t>(),
                         std::get<1>(out).data_ptr<scalar_t>(),
                         std::get<2>(out).data_ptr<int64_t>(),
                         std::get<3>(out).data_ptr<int64_t>(),
                         std::get<4>(out).data_ptr<int64_t>(),
                         std::get<5>(out).data_ptr<int64_t>(),
                         std::get<6>(out).data_ptr<int32_t>()};
    at::parallel_for(0, a.num_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> fill(a.num_experts);
      for (int64_t n = begin; n < end; ++n) plan_one_block(a, n, fill);
    });
  });
}

}  // namespace switch_dit
