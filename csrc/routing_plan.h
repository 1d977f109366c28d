// Routing plan of a Switch-DiT: from every block's gate table and the batch's timesteps,
// the top-k experts of each (block, sample), the samples grouped by expert, and a static
// tile schedule for the Triton kernels. One op, `switch_dit::routing_plan`, with a CPU and
// a CUDA kernel that run the same algorithm (see the selection helpers below).
//
// Shapes (N blocks, T timesteps, M experts, B samples, k = top_k, P = B * k pairs,
// NLT = ceil(seq_len / block_l) token blocks per sample):
//   gate_probs (N, T, M) float32/float16/bfloat16/float64, timesteps (B,) int64
//   topk_idx (N, B, k) int64      topk_w (N, B, k) gate_probs.dtype
//   counts   (N, M) int64         offsets (N, M + 1) int64
//   order    (N, P) int64         position (N, P) int64
//   tiles    (N * P * NLT, 4) int32 rows (block, expert, sample, first token)
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

#if defined(__CUDACC__)
#define SWITCH_DIT_HD __host__ __device__ __forceinline__
#else
#define SWITCH_DIT_HD inline
#endif

namespace switch_dit {

using PlanTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Columns of one row of the tile table.
constexpr int kTileBlock = 0;
constexpr int kTileExpert = 1;
constexpr int kTileSample = 2;
constexpr int kTileToken = 3;
constexpr int kTileColumns = 4;

// The outputs as raw pointers, plus the sizes every kernel needs.
template <typename scalar_t>
struct PlanArgs {
  const scalar_t* probs;  // (N, T, M)
  const int64_t* timesteps;  // (B,)
  int64_t num_blocks, num_timesteps;
  int num_experts, batch, top_k, token_blocks, block_l;
  int64_t* topk_idx;  // (N, B, k)
  scalar_t* topk_w;  // (N, B, k)
  int64_t* counts;  // (N, M)
  int64_t* offsets;  // (N, M + 1)
  int64_t* order;  // (N, P)
  int64_t* position;  // (N, P)
  int32_t* tiles;  // (N * P * NLT, 4)
};

// The total order of top-k: larger probability first, NaN before any number (as torch.sort
// with descending=True), equal values by lower expert index. Both kernels use it, so the CPU
// and CUDA results agree bit for bit.
template <typename acc_t>
SWITCH_DIT_HD bool ranks_before(acc_t va, int ia, acc_t vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

// Selection top-k of one row of M probabilities: slot s takes the best expert that ranks after
// the one of slot s - 1, so no "taken" mask is needed. O(k * M); M is a handful of experts.
template <typename scalar_t, typename acc_t>
SWITCH_DIT_HD void select_topk(const scalar_t* row, int num_experts, int top_k, int64_t* idx_out,
                               scalar_t* w_out) {
  acc_t prev_v = acc_t(0);
  int prev_i = -1;
  for (int s = 0; s < top_k; ++s) {
    int best = -1;
    acc_t best_v = acc_t(0);
    for (int j = 0; j < num_experts; ++j) {
      const acc_t v = static_cast<acc_t>(row[j]);
      if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v, j)) continue;
      if (best < 0 || ranks_before(v, j, best_v, best)) {
        best = j;
        best_v = v;
      }
    }
    idx_out[s] = best;
    w_out[s] = row[best];
    prev_v = best_v;
    prev_i = best;
  }
}

// Checks that need no tensor values (rank, dtype, device, layout, k range, sizes); raises
// c10 errors naming the argument. Returns the number of token blocks per sample.
int64_t check_plan_args(const at::Tensor& gate_probs, const at::Tensor& timesteps, int64_t top_k,
                        int64_t seq_len, int64_t block_l);

// Fill the preallocated outputs (all contiguous, shapes as above).
void routing_plan_cpu_fill(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                           int64_t top_k, int64_t token_blocks, int64_t block_l,
                           const PlanTensors& out);
#if defined(SWITCH_DIT_WITH_CUDA)
void routing_plan_cuda_fill(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                            int64_t top_k, int64_t token_blocks, int64_t block_l,
                            const PlanTensors& out);
#endif

}  // namespace switch_dit
