// CUDA kernel of switch_dit::routing_plan: one launch for all blocks, one thread block (CTA)
// per Switch-DiT block, no host sync. Each thread owns a contiguous chunk of samples, so a
// block-wide exclusive scan per expert gives every pair its stable rank within the expert
// (ascending sample id) without atomics.
#include <type_traits>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cta_scan.cuh"
#include "routing_plan.h"

namespace switch_dit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) routing_plan_kernel(PlanArgs<scalar_t> a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  __shared__ int warp_sums[kWarps];

  const int64_t n = blockIdx.x;
  const int M = a.num_experts, B = a.batch, k = a.top_k;
  const int P = B * k;  // the binding checked B * k < 2^31
  int64_t* idx = a.topk_idx + n * P;
  scalar_t* w = a.topk_w + n * P;
  int64_t* order = a.order + n * P;
  int64_t* position = a.position + n * P;

  const int chunk = (B + kThreads - 1) / kThreads;
  const int b_begin = min(B, static_cast<int>(threadIdx.x) * chunk);
  const int b_end = min(B, b_begin + chunk);

  // 1. Top-k of the owned samples. An out-of-range timestep (possible only with the value
  // check off) gives the sample no expert: index -1, weight 0, left out of every group.
  for (int b = b_begin; b < b_end; ++b) {
    const int64_t t = a.timesteps[b];
    if (t < 0 || t >= a.num_timesteps) {
      for (int s = 0; s < k; ++s) {
        idx[b * k + s] = -1;
        w[b * k + s] = scalar_t(0);
        position[b * k + s] = -1;
      }
      continue;
    }
    const scalar_t* row = a.probs + (n * a.num_timesteps + t) * M;
    select_topk<scalar_t, acc_t>(row, M, k, idx + b * k, w + b * k);
  }

  // 2. Group by expert. A thread reads back only the indices it wrote itself, so no barrier
  // is needed before the scans.
  int base = 0;  // same value in every thread: offsets[e]
  for (int e = 0; e < M; ++e) {
    int mine = 0;
    for (int p = b_begin * k; p < b_end * k; ++p) mine += idx[p] == e;
    int prefix, total;
    cta_exclusive_scan<kWarps>(mine, prefix, total, warp_sums);
    int r = base + prefix;
    for (int p = b_begin * k; p < b_end * k; ++p) {
      if (idx[p] == e) {
        order[r] = p;
        position[p] = r;
        ++r;
      }
    }
    if (threadIdx.x == 0) {
      a.counts[n * M + e] = total;
      a.offsets[n * (M + 1) + e] = base;
    }
    base += total;
  }
  if (threadIdx.x == 0) a.offsets[n * (M + 1) + M] = base;
  for (int r = base + threadIdx.x; r < P; r += kThreads) order[r] = -1;
  __syncthreads();  // order and idx of the whole CTA are read below

  // 3. Tile rows, (rank, token block) major, written as 16-byte vectors.
  const int64_t nlt = a.token_blocks;
  const int64_t num_tiles = static_cast<int64_t>(P) * nlt;
  int4* tiles = reinterpret_cast<int4*>(a.tiles) + n * num_tiles;
  for (int64_t q = threadIdx.x; q < num_tiles; q += kThreads) {
    const int64_t r = q / nlt;
    const int64_t p = order[r];
    int4 row = make_int4(-1, -1, -1, -1);
    if (p >= 0) {
      row.x = static_cast<int>(n);
      row.y = static_cast<int>(idx[p]);
      row.z = static_cast<int>(p / k);
      row.w = static_cast<int>((q - r * nlt) * a.block_l);
    }
    tiles[q] = row;
  }
}

}  // namespace

void routing_plan_cuda_fill(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                            int64_t top_k, int64_t token_blocks, int64_t block_l,
                            const PlanTensors& out) {
  static_assert(kTileColumns == 4, "tile rows are stored as int4");
  if (gate_probs.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(gate_probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_probs.scalar_type(),
                                  "routing_plan_cuda", [&] {
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
    routing_plan_kernel<scalar_t>
        <<<static_cast<unsigned>(a.num_blocks), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace switch_dit
