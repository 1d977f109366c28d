// ctest program: switch_dit::routing_plan, called through the dispatcher, against a brute-force
// plan built with std::stable_sort; the CUDA kernel against the CPU one where a GPU exists;
// bad arguments raise c10 errors that name them. Exit status 0 when every check passes.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "routing_plan.h"

namespace {

using PlanFn = switch_dit::PlanTensors(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                       int64_t, bool);

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

c10::TypedOperatorHandle<PlanFn> plan_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("switch_dit::routing_plan", "")
      .typed<PlanFn>();
}

// The plan from its definition: stable-sort each row by (probability desc, index asc), then
// stable-sort the pairs by expert.
switch_dit::PlanTensors brute_force(const at::Tensor& probs, const at::Tensor& t, int64_t k,
                                    int64_t seq_len, int64_t block_l) {
  const int64_t N = probs.size(0), M = probs.size(2), B = t.size(0), P = B * k;
  const int64_t nlt = (seq_len + block_l - 1) / block_l;
  auto p = probs.accessor<float, 3>();
  auto ts = t.accessor<int64_t, 1>();
  at::Tensor idx = at::empty({N, B, k}, at::kLong), w = at::empty({N, B, k});
  at::Tensor counts = at::zeros({N, M}, at::kLong), offsets = at::zeros({N, M + 1}, at::kLong);
  at::Tensor order = at::empty({N, P}, at::kLong), position = at::empty({N, P}, at::kLong);
  at::Tensor tiles = at::empty({N * P * nlt, 4}, at::kInt);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int64_t> flat(P);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int> e(M);
      std::iota(e.begin(), e.end(), 0);
      std::stable_sort(e.begin(), e.end(), [&](int i, int j) { return p[n][ts[b]][i] > p[n][ts[b]][j]; });
      for (int64_t s = 0; s < k; ++s) {
        flat[b * k + s] = e[s];
        idx[n][b][s] = e[s];
        w[n][b][s] = p[n][ts[b]][e[s]];
        counts[n][e[s]] += 1;
      }
    }
    for (int64_t e = 0; e < M; ++e) offsets[n][e + 1] = offsets[n][e] + counts[n][e];
    std::vector<int64_t> ord(P);
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(), [&](int64_t a, int64_t b) { return flat[a] < flat[b]; });
    for (int64_t r = 0; r < P; ++r) {
      order[n][r] = ord[r];
      position[n][ord[r]] = r;
      for (int64_t j = 0; j < nlt; ++j) {
        const int64_t row = (n * P + r) * nlt + j;
        tiles[row][0] = static_cast<int>(n);
        tiles[row][1] = static_cast<int>(flat[ord[r]]);
        tiles[row][2] = static_cast<int>(ord[r] / k);
        tiles[row][3] = static_cast<int>(j * block_l);
      }
    }
  }
  return {idx, w, counts, offsets, order, position, tiles};
}

bool plans_equal(const switch_dit::PlanTensors& a, const switch_dit::PlanTensors& b) {
  return at::equal(std::get<0>(a).cpu(), std::get<0>(b).cpu()) &&
         at::equal(std::get<1>(a).cpu(), std::get<1>(b).cpu()) &&
         at::equal(std::get<2>(a).cpu(), std::get<2>(b).cpu()) &&
         at::equal(std::get<3>(a).cpu(), std::get<3>(b).cpu()) &&
         at::equal(std::get<4>(a).cpu(), std::get<4>(b).cpu()) &&
         at::equal(std::get<5>(a).cpu(), std::get<5>(b).cpu()) &&
         at::equal(std::get<6>(a).cpu(), std::get<6>(b).cpu());
}

template <typename Fn>
void expect_error(Fn fn, const std::string& needle) {
  try {
    fn();
    expect(false, "no error for bad " + needle);
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           "error for bad " + needle + " does not name it: " + e.what());
  }
}

}  // namespace

int main() {
  const auto op = plan_op();
  at::manual_seed(0);
  struct Case { int64_t N, T, M, B, k, seq_len, block_l; };
  for (const Case c : {Case{3, 20, 4, 37, 2, 10, 4}, Case{2, 9, 3, 1, 3, 5, 8},
                       Case{28, 1000, 3, 1024, 2, 64, 32}}) {
    at::Tensor probs = at::randn({c.N, c.T, c.M}).softmax(-1);
    probs.select(1, 0).fill_(0.25f);  // exact ties at timestep 0
    at::Tensor t = at::randint(0, c.T, {c.B}, at::kLong);
    t[0] = 0;
    const auto got = op.call(probs, t, c.k, c.seq_len, c.block_l, false);
    expect(plans_equal(got, brute_force(probs, t, c.k, c.seq_len, c.block_l)),
           "CPU plan == brute force (N=" + std::to_string(c.N) + ", B=" + std::to_string(c.B) + ")");
#if defined(SWITCH_DIT_WITH_CUDA)
    if (at::hasCUDA()) {
      const auto gpu = op.call(probs.cuda(), t.cuda(), c.k, c.seq_len, c.block_l, false);
      expect(plans_equal(gpu, got), "CUDA plan == CPU plan");
    }
#endif
  }

  const at::Tensor probs = at::rand({2, 10, 3}), t = at::zeros({4}, at::kLong);
  expect_error([&] { op.call(probs, t, 0, 0, 1, false); }, "top_k");
  expect_error([&] { op.call(probs, t, 4, 0, 1, false); }, "top_k");
  expect_error([&] { op.call(probs[0], t, 1, 0, 1, false); }, "gate_probs");
  expect_error([&] { op.call(probs, t.to(at::kInt), 1, 0, 1, false); }, "timesteps");
  expect_error([&] { op.call(probs, at::full({2}, 10, at::kLong), 1, 0, 1, false); }, "timesteps");
  expect_error([&] { op.call(probs, t, 1, 0, 0, false); }, "block_l");

  if (failures == 0) std::printf("routing_plan: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
