// SAM's first pass on CUDA: cl_optim::grad_sq_norm (two-stage, deterministic: no float atomics)
// and cl_optim::sam_perturb_ (the scale read from device memory: no host synchronisation).
#include <cl_optim/elementwise.h>
#include <cl_optim/flags.h>

#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {

// Stage 1: each block writes the sum of (T g)^2 over its chunk to partials[launch_offset + block],
// in fp64: the square of a large finite gradient (1e20) overflows fp32, and SAM must not take a
// finite gradient for a non-finite one. A reduction reads 2-4 bytes per element; fp64 adds cost
// only on GPUs with little fp64 throughput.
// Lists: 0 grad, 1 param (ASAM), 2 running Fisher (fp32, Fisher-SAM). scalars[0][t]: the
// SamWeight kind of tensor t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_sq_norm_partials(TensorListMeta<3> meta, float eta, double* partials, int launch_offset) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  const auto* g = static_cast<const scalar_t*>(meta.addresses[0][t]);
  const auto* p = static_cast<const scalar_t*>(meta.addresses[1][t]);
  const auto* f = static_cast<const float*>(meta.addresses[2][t]);
  const int kind = static_cast<int>(meta.scalars[0][t]);
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float gv = load_as<float>(g[i]);
    switch (kind) {  // uniform per block: no divergence
      case kSamAsam: sum += sam_norm_term<kSamAsam, double>(load_as<float>(p[i]), gv, 0.f, eta); break;
      case kSamFisherBatch: sum += sam_norm_term<kSamFisherBatch, double>(0.f, gv, 0.f, eta); break;
      case kSamFisherRunning: sum += sam_norm_term<kSamFisherRunning, double>(0.f, gv, f[i], eta); break;
      default: sum += sam_norm_term<kSamPlain, double>(0.f, gv, 0.f, eta);
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[launch_offset + blockIdx.x] = sum;
}

// perturb: save <- p; [F <- beta F + (1-beta)(g * inv_scale)^2 where *finite]; p <- p + s T^2 g,
// T^2 read from the Fisher before its update. Lists: 0 param, 1 grad, 2 save, 3 fisher (fp32).
// scalars[0][t]: the SamWeight kind of tensor t.
template <typename scalar_t, bool FISHER>
__global__ void __launch_bounds__(kThreads)
    sam_perturb_kernel(TensorListMeta<4> meta, const float* scale, const float* inv_scale, const bool* finite,
                       float eta, float fisher_beta) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* p = static_cast<scalar_t*>(meta.addresses[0][t]);
  const auto* g = static_cast<const scalar_t*>(meta.addresses[1][t]);
  auto* save = static_cast<scalar_t*>(meta.addresses[2][t]);
  auto* fisher = static_cast<float*>(meta.addresses[3][t]);
  const int kind = static_cast<int>(meta.scalars[0][t]);
  const float s = *scale;
  const auto terms = make_grad_terms<float>(load_or(inv_scale, 1.f), 1.f, false, fisher_beta, 1.f - fisher_beta);
  const bool update_fisher = FISHER && (finite == nullptr || *finite);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float pv = load_as<float>(p[i]), gv = load_as<float>(g[i]);
    float weight_sq;
    switch (kind) {
      case kSamAsam: weight_sq = sam_weight_sq<kSamAsam, float>(pv, gv, 0.f, eta); break;
      case kSamFisherBatch: weight_sq = sam_weight_sq<kSamFisherBatch, float>(pv, gv, 0.f, eta); break;
      case kSamFisherRunning: weight_sq = sam_weight_sq<kSamFisherRunning, float>(pv, gv, fisher[i], eta); break;
      default: weight_sq = 1.f;
    }
    save[i] = p[i];
    if (update_fisher) task_grad<true, false>(gv, pv, fisher[i], 0.f, 0.f, 0.f, terms);
    p[i] = store_as<scalar_t>(pv + sam_perturbation<float>(gv, weight_sq, s));
  }
}

void grad_sq_norm_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                       const std::vector<float>& kinds, float eta, double* partials, double* out, cudaStream_t stream) {
  int offset = 0;
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<3>(lists, sizes, kinds, {}, [&](const TensorListMeta<3>& meta, int blocks) {
      grad_sq_norm_partials<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, eta, partials, offset);
      check(cudaGetLastError(), "grad_sq_norm_partials launch");
      offset += blocks;
    });
  });
  sum_partials<double><<<1, kThreads, 0, stream>>>(partials, offset, nullptr, out);
  check(cudaGetLastError(), "sum_partials launch");
}

void sam_perturb_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                      const std::vector<float>& kinds, const float* scale, const float* inv_scale,
                      const bool* finite, float eta, float fisher_beta, bool fisher, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    with_flags(
        [&](auto FISHER) {
          multi_tensor_apply<4>(lists, sizes, kinds, {}, [&](const TensorListMeta<4>& meta, int blocks) {
            sam_perturb_kernel<scalar_t, FISHER()>
                <<<blocks, kThreads, 0, stream>>>(meta, scale, inv_scale, finite, eta, fisher_beta);
            check(cudaGetLastError(), "sam_perturb_kernel launch");
          });
        },
        fisher);
  });
}

}  // namespace cl_optim::cuda
