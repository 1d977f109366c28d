// CUDA kernels of switch_dit::group_tokens (see token_grouping.h), two launches, no host sync:
//   1. count: one CTA per expert reduces its row of `valid`;
//   2. place: one CTA per expert sums the counts of the experts before it (E is small), then
//      scans its row chunk by chunk, so each valid slot gets its rank without atomics; it also
//      writes its expert's tiles, and all CTAs together fill the unused tails with -1.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cta_scan.cuh"
#include "token_grouping.h"

namespace switch_dit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ bool slot_valid(const GroupArgs& a, int64_t p) {
  return a.valid == nullptr || a.valid[p];
}

__global__ void __launch_bounds__(kThreads) count_kernel(GroupArgs a) {
  __shared__ int warp_sums[kWarps];
  const int64_t e = blockIdx.x, C = a.capacity;
  int64_t n = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) n += slot_valid(a, e * C + c);
  int prefix, total;
  cta_exclusive_scan<kWarps>(static_cast<int>(n), prefix, total, warp_sums);
  if (threadIdx.x == 0) a.counts[e] = total;
}

__global__ void __launch_bounds__(kThreads) place_kernel(GroupArgs a) {
  __shared__ int warp_sums[kWarps];
  __shared__ int64_t base_s, total_s, tbase_s, ttotal_s;
  const int64_t e = blockIdx.x, E = a.num_experts, C = a.capacity, bm = a.block_m;
  if (threadIdx.x == 0) {
    int64_t base = 0, total = 0, tbase = 0, ttotal = 0;
    for (int64_t j = 0; j < E; ++j) {
      const int64_t n = a.counts[j], t = (n + bm - 1) / bm;
      if (j < e) {
        base += n;
        tbase += t;
      }
      total += n;
      ttotal += t;
    }
    base_s = base;
    total_s = total;
    tbase_s = tbase;
    ttotal_s = ttotal;
    a.offsets[e] = base;
    if (e == E - 1) a.offsets[E] = total;
  }
  __syncthreads();
  const int64_t base = base_s, total = total_s, tbase = tbase_s, ttotal = ttotal_s;

  int64_t running = 0;
  for (int64_t start = 0; start < C; start += kThreads) {
    const int64_t c = start + threadIdx.x, p = e * C + c;
    const bool on = c < C && slot_valid(a, p);
    int prefix, chunk;
    cta_exclusive_scan<kWarps>(on ? 1 : 0, prefix, chunk, warp_sums);
    if (c < C) {
      const int64_t r = on ? base + running + prefix : -1;
      a.position[p] = r;
      if (on) {
        a.tokens[r] = a.index[p];
        a.pair[r] = p;
        a.row_expert[r] = e;
      }
    }
    running += chunk;
  }
  const int64_t mine = (a.counts[e] + bm - 1) / bm;
  for (int64_t j = threadIdx.x; j < mine; j += kThreads) {
    a.tiles[2 * (tbase + j)] = static_cast<int32_t>(e);
    a.tiles[2 * (tbase + j) + 1] = static_cast<int32_t>(base + j * bm);
  }
  const int64_t stride = E * kThreads, me = e * kThreads + threadIdx.x;
  for (int64_t r = total + me; r < E * C; r += stride) {
    a.tokens[r] = -1;
    a.pair[r] = -1;
    a.row_expert[r] = -1;
  }
  for (int64_t t = ttotal + me; t < a.num_tiles; t += stride) {
    a.tiles[2 * t] = -1;
    a.tiles[2 * t + 1] = -1;
  }
}

}  // namespace

void group_tokens_cuda_fill(const GroupArgs& a, const at::Tensor& like) {
  if (a.num_experts == 0) return;
  const c10::cuda::CUDAGuard guard(like.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(a.num_experts);
  count_kernel<<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  place_kernel<<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace switch_dit
