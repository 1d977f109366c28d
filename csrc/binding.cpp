// Registration of switch_dit::routing_plan: schema, argument checks, output allocation and the
// CPU / CUDA kernels. The fake (meta) implementation and autograd live in Python
// (switch_dit/routing.py), which the schema names as its python module.
#if defined(SWITCH_DIT_PYTHON_MODULE)
#include <Python.h>  // first, as Python requires
#endif

#include <limits>

#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(SWITCH_DIT_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "routing_plan.h"
#include "token_grouping.h"

namespace switch_dit {

int64_t check_plan_args(const at::Tensor& gate_probs, const at::Tensor& timesteps, int64_t top_k,
                        int64_t seq_len, int64_t block_l) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(gate_probs.dim() == 3,
                    "routing_plan: gate_probs must have shape (N, T, M), got ", gate_probs.dim(),
                    " dimensions with shape ", gate_probs.sizes());
  const auto dt = gate_probs.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "routing_plan: gate_probs must be float32, float16, bfloat16 or float64, got ",
                   dt);
  TORCH_CHECK_VALUE(timesteps.dim() == 1, "routing_plan: timesteps must have shape (B,), got ",
                    timesteps.dim(), " dimensions with shape ", timesteps.sizes());
  TORCH_CHECK_TYPE(timesteps.scalar_type() == at::kLong,
                   "routing_plan: timesteps must be int64, got ", timesteps.scalar_type());
  TORCH_CHECK_VALUE(timesteps.device() == gate_probs.device(),
                    "routing_plan: timesteps must be on the device of gate_probs (",
                    gate_probs.device(), "), got ", timesteps.device());
  TORCH_CHECK_VALUE(gate_probs.is_contiguous(), "routing_plan: gate_probs must be contiguous");
  TORCH_CHECK_VALUE(timesteps.is_contiguous(), "routing_plan: timesteps must be contiguous");
  const int64_t N = gate_probs.size(0), T = gate_probs.size(1), M = gate_probs.size(2);
  const int64_t B = timesteps.size(0);
  TORCH_CHECK_VALUE(T >= 1 && M >= 1,
                    "routing_plan: gate_probs must have at least one timestep and one expert, "
                    "got shape ", gate_probs.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= M, "routing_plan: top_k must be in [1, M] with M = ",
                    M, " experts (gate_probs.size(2)), got ", top_k);
  TORCH_CHECK_VALUE(seq_len >= 0, "routing_plan: seq_len must be >= 0, got ", seq_len);
  TORCH_CHECK_VALUE(block_l >= 1, "routing_plan: block_l must be >= 1, got ", block_l);
  TORCH_CHECK_VALUE(N <= kInt32Max && M <= kInt32Max && B * top_k <= kInt32Max &&
                        seq_len + block_l <= kInt32Max,
                    "routing_plan: sizes must fit int32 (N = ", N, ", M = ", M, ", B * top_k = ",
                    B * top_k, ", seq_len + block_l = ", seq_len + block_l, ")");
  return (seq_len + block_l - 1) / block_l;
}

namespace {

PlanTensors allocate(const at::Tensor& gate_probs, int64_t B, int64_t top_k, int64_t token_blocks) {
  const int64_t N = gate_probs.size(0), M = gate_probs.size(2), P = B * top_k;
  const auto i64 = gate_probs.options().dtype(at::kLong);
  return {at::empty({N, B, top_k}, i64),
          at::empty({N, B, top_k}, gate_probs.options()),
          at::empty({N, M}, i64),
          at::empty({N, M + 1}, i64),
          at::empty({N, P}, i64),
          at::empty({N, P}, i64),
          at::empty({N * P * token_blocks, kTileColumns}, gate_probs.options().dtype(at::kInt))};
}

// Copies min and max of the timesteps to the host (one sync on a device) and raises if any
// lies outside [0, T).
void check_timestep_values(const at::Tensor& timesteps, int64_t T) {
  if (timesteps.numel() == 0) return;
  const at::Tensor range = at::stack({timesteps.min(), timesteps.max()}).cpu();
  const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < T, "routing_plan: timesteps must lie in [0, T) with T = ", T,
                    " (gate_probs.size(1)), got values in [", lo, ", ", hi, "]");
}

PlanTensors routing_plan_cpu(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                             int64_t top_k, int64_t seq_len, int64_t block_l, bool /*check*/) {
  const int64_t nlt = check_plan_args(gate_probs, timesteps, top_k, seq_len, block_l);
  // On the CPU the value check costs nothing worth saving: always on.
  check_timestep_values(timesteps, gate_probs.size(1));
  PlanTensors out = allocate(gate_probs, timesteps.size(0), top_k, nlt);
  routing_plan_cpu_fill(gate_probs, timesteps, top_k, nlt, block_l, out);
  return out;
}

#if defined(SWITCH_DIT_WITH_CUDA)
PlanTensors routing_plan_cuda(const at::Tensor& gate_probs, const at::Tensor& timesteps,
                              int64_t top_k, int64_t seq_len, int64_t block_l, bool check) {
  const int64_t nlt = check_plan_args(gate_probs, timesteps, top_k, seq_len, block_l);
  const c10::cuda::CUDAGuard guard(gate_probs.device());
  if (check) check_timestep_values(timesteps, gate_probs.size(1));
  PlanTensors out = allocate(gate_probs, timesteps.size(0), top_k, nlt);
  routing_plan_cuda_fill(gate_probs, timesteps, top_k, nlt, block_l, out);
  return out;
}
#endif

// -- group_tokens (token_grouping.h) ----------------------------------------------------------

void check_group_args(const at::Tensor& index, const std::optional<at::Tensor>& valid,
                      int64_t block_m) {
  TORCH_CHECK_VALUE(index.dim() == 2, "group_tokens: index must have shape (E, C), got ",
                    index.dim(), " dimensions with shape ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "group_tokens: index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.is_contiguous(), "group_tokens: index must be contiguous");
  if (valid.has_value()) {
    TORCH_CHECK_TYPE(valid->scalar_type() == at::kBool, "group_tokens: valid must be bool, got ",
                     valid->scalar_type());
    TORCH_CHECK_VALUE(valid->sizes() == index.sizes(), "group_tokens: valid must have the shape "
                      "of index ", index.sizes(), ", got ", valid->sizes());
    TORCH_CHECK_VALUE(valid->device() == index.device(), "group_tokens: valid must be on the "
                      "device of index (", index.device(), "), got ", valid->device());
    TORCH_CHECK_VALUE(valid->is_contiguous(), "group_tokens: valid must be contiguous");
  }
  TORCH_CHECK_VALUE(block_m >= 1, "group_tokens: block_m must be >= 1, got ", block_m);
  TORCH_CHECK_VALUE(index.numel() + block_m < std::numeric_limits<int32_t>::max(),
                    "group_tokens: E * C + block_m must fit int32, got ", index.numel() + block_m);
}

GroupTensors group_tokens_impl(const at::Tensor& index, const std::optional<at::Tensor>& valid,
                               int64_t block_m) {
  check_group_args(index, valid, block_m);
  const int64_t E = index.size(0), C = index.size(1);
  const int64_t T = group_num_tiles(E, C, block_m);
  const auto i64 = index.options();
  GroupTensors out{at::empty({E}, i64), at::empty({E + 1}, i64), at::empty({E * C}, i64),
                   at::empty({E * C}, i64), at::empty({E * C}, i64), at::empty({E, C}, i64),
                   at::empty({T, 2}, i64.dtype(at::kInt))};
  GroupArgs a{index.const_data_ptr<int64_t>(),
              valid.has_value() ? valid->const_data_ptr<bool>() : nullptr,
              E, C, block_m, T,
              std::get<0>(out).data_ptr<int64_t>(), std::get<1>(out).data_ptr<int64_t>(),
              std::get<2>(out).data_ptr<int64_t>(), std::get<3>(out).data_ptr<int64_t>(),
              std::get<4>(out).data_ptr<int64_t>(), std::get<5>(out).data_ptr<int64_t>(),
              std::get<6>(out).data_ptr<int32_t>()};
  if (E == 0) {  // no expert: offsets = [0], every other output is empty
    std::get<1>(out).zero_();
    return out;
  }
#if defined(SWITCH_DIT_WITH_CUDA)
  if (index.is_cuda()) {
    group_tokens_cuda_fill(a, index);
    return out;
  }
#endif
  group_tokens_cpu_fill(a);
  return out;
}

}  // namespace
}  // namespace switch_dit

TORCH_LIBRARY(switch_dit, m) {
  m.set_python_module("switch_dit.routing");
  m.def(
      "routing_plan(Tensor gate_probs, Tensor timesteps, int top_k, int seq_len, int block_l, "
      "bool check) -> (Tensor topk_idx, Tensor topk_w, Tensor counts, Tensor offsets, "
      "Tensor order, Tensor position, Tensor tiles)");
  // Fake kernel: switch_dit/grouping.py.
  m.def(
      "group_tokens(Tensor index, Tensor? valid, int block_m) -> (Tensor counts, Tensor offsets, "
      "Tensor tokens, Tensor pair, Tensor row_expert, Tensor position, Tensor tiles)");
}

TORCH_LIBRARY_IMPL(switch_dit, CPU, m) {
  m.impl("routing_plan", &switch_dit::routing_plan_cpu);
  m.impl("group_tokens", &switch_dit::group_tokens_impl);
}

#if defined(SWITCH_DIT_WITH_CUDA)
TORCH_LIBRARY_IMPL(switch_dit, CUDA, m) {
  m.impl("routing_plan", &switch_dit::routing_plan_cuda);
  m.impl("group_tokens", &switch_dit::group_tokens_impl);
}
#endif

#if defined(SWITCH_DIT_PYTHON_MODULE)
// `import switch_dit._C` loads the library, which runs the registrations above; the module
// itself is empty, so no pybind11 is compiled.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "switch_dit C++/CUDA ops", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
