// The Fisher and EWC element ops on CUDA (DESIGN.md §3): fisher_accumulate_, ewc_grad_add_,
// ewc_penalty, ewc_consolidate_, on the per-element math of csrc/include/cl_optim/elementwise.h
// that the CPU backend runs. Reductions are two-stage and deterministic (double partials, no atomics).
#include <cl_optim/elementwise.h>
#include <cl_optim/flags.h>

#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {

// F += weight * g^2. Lists: 0 fisher (fp32), 1 grad.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fisher_accumulate_kernel(TensorListMeta<2> meta, float weight) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* f = static_cast<float*>(meta.addresses[0][t]);
  const auto* g = static_cast<const scalar_t*>(meta.addresses[1][t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    f[i] = fisher_accumulate<float>(f[i], load_as<float>(g[i]), weight);
}

// g += lam_t * A * (p - mu). Lists: 0 grad, 1 param, 2 precision, 3 anchor; scalars[0][t] = lam_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ewc_grad_add_kernel(TensorListMeta<4> meta) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* g = static_cast<scalar_t*>(meta.addresses[0][t]);
  const auto* p = static_cast<const scalar_t*>(meta.addresses[1][t]);
  const auto* a = static_cast<const float*>(meta.addresses[2][t]);
  const auto* mu = static_cast<const float*>(meta.addresses[3][t]);
  const float lam = meta.scalars[0][t];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    g[i] = store_as<scalar_t>(
        ewc_pull<float>(load_as<float>(g[i]), load_as<float>(p[i]), a[i], mu[i], lam));
}

// Stage 1 of the penalty: partials[offset + block] = lam_t / 2 * sum A (p - mu)^2 over the chunk,
// in double as the CPU backend. Lists: 0 param, 1 precision, 2 anchor; scalars[0][t] = lam_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ewc_penalty_partials(TensorListMeta<3> meta, double* partials, int64_t launch_offset) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  const auto* p = static_cast<const scalar_t*>(meta.addresses[0][t]);
  const auto* a = static_cast<const float*>(meta.addresses[1][t]);
  const auto* mu = static_cast<const float*>(meta.addresses[2][t]);
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    sum += ewc_penalty_term<double>(static_cast<double>(load_as<float>(p[i])), a[i], mu[i]);
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[launch_offset + blockIdx.x] = 0.5 * static_cast<double>(meta.scalars[0][t]) * sum;
}

// A' = decay A + weight F; mu' as ewc_consolidate (elementwise.h); partials[offset + block] = the
// chunk's constant increment. Lists: 0 precision, 1 anchor, 2 fisher, 3 param.
template <typename scalar_t, bool WEIGHTED_ANCHOR>
__global__ void __launch_bounds__(kThreads)
    ewc_consolidate_kernel(TensorListMeta<4> meta, float decay, float weight, double* partials, int64_t launch_offset) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* a = static_cast<float*>(meta.addresses[0][t]);
  auto* mu = static_cast<float*>(meta.addresses[1][t]);
  const auto* f = static_cast<const float*>(meta.addresses[2][t]);
  const auto* p = static_cast<const scalar_t*>(meta.addresses[3][t]);
  double gap = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    gap += static_cast<double>(
        ewc_consolidate<WEIGHTED_ANCHOR>(a[i], mu[i], f[i], load_as<float>(p[i]), decay, weight));
  gap = block_sum(gap);
  if (threadIdx.x == 0) partials[launch_offset + blockIdx.x] = gap;
}

void fisher_accumulate_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, float weight,
                            cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<2>(lists, sizes, {}, {}, [&](const TensorListMeta<2>& meta, int blocks) {
      fisher_accumulate_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, weight);
      check(cudaGetLastError(), "fisher_accumulate_kernel launch");
    });
  });
}

void ewc_grad_add_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& lam,
                       cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<4>(lists, sizes, lam, {}, [&](const TensorListMeta<4>& meta, int blocks) {
      ewc_grad_add_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta);
      check(cudaGetLastError(), "ewc_grad_add_kernel launch");
    });
  });
}

void ewc_penalty_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& lam,
                      double* partials, double* out, cudaStream_t stream) {
  int64_t offset = 0;
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<3>(lists, sizes, lam, {}, [&](const TensorListMeta<3>& meta, int blocks) {
      ewc_penalty_partials<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, partials, offset);
      check(cudaGetLastError(), "ewc_penalty_partials launch");
      offset += blocks;
    });
  });
  sum_partials<double><<<1, kThreads, 0, stream>>>(partials, offset, nullptr, out);
  check(cudaGetLastError(), "sum_partials launch");
}

void ewc_consolidate_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, float decay, float weight,
                          bool weighted_anchor, double* partials, const int64_t* tensor_ends, double* out,
                          cudaStream_t stream) {
  int64_t offset = 0;
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    with_flags(
        [&](auto WEIGHTED) {
          multi_tensor_apply<4>(lists, sizes, {}, {}, [&](const TensorListMeta<4>& meta, int blocks) {
            ewc_consolidate_kernel<scalar_t, WEIGHTED()>
                <<<blocks, kThreads, 0, stream>>>(meta, decay, weight, partials, offset);
            check(cudaGetLastError(), "ewc_consolidate_kernel launch");
            offset += blocks;
          });
        },
        weighted_anchor);
  });
  // One block per tensor, empty tensors included (their range is empty: 0).
  sum_partials<double><<<static_cast<unsigned>(sizes.size()), kThreads, 0, stream>>>(partials, offset, tensor_ends, out);
  check(cudaGetLastError(), "sum_partials launch");
}

}  // namespace cl_optim::cuda
