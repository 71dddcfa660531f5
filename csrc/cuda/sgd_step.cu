// cl_optim::sgd_step_ on CUDA: the per-element math of csrc/include/cl_optim/elementwise.h over a
// multi-tensor-apply launch.
#include <cl_optim/elementwise.h>
#include <cl_optim/flags.h>

#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {

// Lists and arguments: launchers.h. scalars[0][t]: the EWC lambda of tensor t.
template <typename scalar_t, bool SAVE, bool FISHER, bool EWC, bool MOMENTUM, bool READY>
__global__ void __launch_bounds__(kThreads) sgd_kernel(TensorListMeta<kSgdLists> meta, SgdDeviceArgs args) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* p = static_cast<scalar_t*>(meta.addresses[0][t]);
  const auto* g = static_cast<const scalar_t*>(meta.addresses[1][t]);
  auto* buf = static_cast<scalar_t*>(meta.addresses[2][t]);
  const auto* save = static_cast<const scalar_t*>(meta.addresses[3][t]);
  auto* fisher = static_cast<float*>(meta.addresses[4][t]);
  const auto* precision = static_cast<const float*>(meta.addresses[5][t]);
  const auto* anchor = static_cast<const float*>(meta.addresses[6][t]);
  const bool skip = load_or(args.found_inf, 0.f) != 0.f;
  const float ewc_lam = meta.scalars[0][t];
  const auto terms = make_grad_terms<float>(load_or(args.inv_scale, 1.f), load_or(args.clip_coef, 1.f),
                                            args.sign < 0.f, args.fisher_beta, 1.f - args.fisher_beta);
  const SgdParams<float> s{args.lr, args.momentum, args.one_minus_dampening,
                           args.weight_decay, args.nesterov};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (skip) {  // a skipped step still restores the weights, and starts no buffer (zeros, as on the CPU)
      if (SAVE) p[i] = save[i];
      if (MOMENTUM && !READY) buf[i] = store_as<scalar_t>(0.f);
      continue;
    }
    float pv;
    const float g_in = args.n_sources >= 0 ? combined_grad(meta, 7, t, i, g, args.combine_coef, args.n_sources)
                                           : load_as<float>(g[i]);
    const float gv =
        restored_task_grad_of<SAVE, FISHER, EWC>(p, save, g_in, fisher, precision, anchor, i, ewc_lam, terms, pv);
    float bv = MOMENTUM ? load_as<float>(buf[i]) : 0.f;
    sgd_update<MOMENTUM>(pv, gv, bv, READY, s);
    if (MOMENTUM) buf[i] = store_as<scalar_t>(bv);
    if (args.descent_coef)  // DESCENT, after the update (the same for every thread)
      pv = descended(meta, 7, t, i, g, load_as<float>(store_as<scalar_t>(pv)), args.descent_coef, args.n_sources);
    p[i] = store_as<scalar_t>(pv);
  }
}

void sgd_step_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& ewc_lam,
                   const SgdDeviceArgs& args, bool save, bool fisher, bool ewc, bool momentum, bool ready,
                   cudaStream_t stream) {
  auto by_flags = [&](auto tag) {
    using scalar_t = decltype(tag);
    with_flags(
        [&](auto SAVE, auto FISHER, auto EWC, auto MOMENTUM, auto READY) {
          multi_tensor_apply<kSgdLists>(lists, sizes, ewc_lam, {}, [&](const TensorListMeta<kSgdLists>& meta,
                                                                       int blocks) {
            sgd_kernel<scalar_t, SAVE(), FISHER(), EWC(), MOMENTUM(), READY()><<<blocks, kThreads, 0, stream>>>(meta, args);
            check(cudaGetLastError(), "sgd_kernel launch");
          });
        },
        save, fisher, ewc, momentum, ready);
  };
  by_dtype(dtype, by_flags);
}

}  // namespace cl_optim::cuda
