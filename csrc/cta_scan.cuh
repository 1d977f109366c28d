// Block-wide (CTA) exclusive scan shared by the CUDA kernels of routing_plan and
// token_grouping: both rank items within an expert without atomics by scanning one int per
// thread.
#pragma once

namespace switch_dit {

// Exclusive scan of one int per thread over a CTA of kWarps * 32 threads; every thread gets
// its prefix and the total. All threads must call it (it synchronises); `warp_sums` is shared
// memory holding kWarps ints (kWarps <= 32).
template <int kWarps>
__device__ __forceinline__ void cta_exclusive_scan(int v, int& prefix, int& total, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < kWarps; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += y;
    }
    if (lane < kWarps) warp_sums[lane] = s;
  }
  __syncthreads();
  prefix = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
}

}  // namespace switch_dit
