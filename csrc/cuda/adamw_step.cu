// cl_optim::adamw_step_ on CUDA: the per-element math of csrc/include/cl_optim/elementwise.h
// (the same functions the CPU tests exercise) over a multi-tensor-apply launch.
#include <cl_optim/elementwise.h>
#include <cl_optim/flags.h>

#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {

// Lists and arguments: launchers.h. scalars[0][t]: the EWC lambda of tensor t. The bias
// corrections come from the step count on the device (list 9), counted by the glue before the
// launch: no host read of it, so AMP's skip (which does not count the step) needs no sync.
template <typename scalar_t, bool SAVE, bool FISHER, bool EWC, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorListMeta<kAdamWLists> meta, AdamWDeviceArgs args) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* p = static_cast<scalar_t*>(meta.addresses[0][t]);
  const auto* g = static_cast<const scalar_t*>(meta.addresses[1][t]);
  auto* m = static_cast<scalar_t*>(meta.addresses[2][t]);
  auto* v = static_cast<scalar_t*>(meta.addresses[3][t]);
  auto* vmax = static_cast<scalar_t*>(meta.addresses[4][t]);
  const auto* save = static_cast<const scalar_t*>(meta.addresses[5][t]);
  auto* fisher = static_cast<float*>(meta.addresses[6][t]);
  const auto* precision = static_cast<const float*>(meta.addresses[7][t]);
  const auto* anchor = static_cast<const float*>(meta.addresses[8][t]);
  const bool skip = load_or(args.found_inf, 0.f) != 0.f;
  const float ewc_lam = meta.scalars[0][t];
  const auto terms = make_grad_terms<float>(load_or(args.inv_scale, 1.f), load_or(args.clip_coef, 1.f),
                                            args.sign < 0.f, args.fisher_beta, 1.f - args.fisher_beta);
  // torch.optim.AdamW's bias corrections, in double as the CPU backend forms them on the host;
  // once per block (thread 0), not once per thread.
  __shared__ float bias_terms[2];
  if (threadIdx.x == 0) {
    const double step = static_cast<double>(*static_cast<const float*>(meta.addresses[9][t]));
    bias_terms[0] = static_cast<float>(args.lr_exact / (1.0 - ::pow(args.beta1_exact, step)));
    bias_terms[1] = static_cast<float>(::sqrt(1.0 - ::pow(args.beta2_exact, step)));
  }
  __syncthreads();
  const AdamWParams<float> a{args.decay,         args.one_minus_beta1, args.beta2,   args.one_minus_beta2,
                             args.eps,           bias_terms[0],        bias_terms[1]};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (skip) {  // a skipped step still restores the weights
      if (SAVE) p[i] = save[i];
      continue;
    }
    float pv;
    const float g_in = args.n_sources >= 0 ? combined_grad(meta, 10, t, i, g, args.combine_coef, args.n_sources)
                                           : load_as<float>(g[i]);
    const float gv =
        restored_task_grad_of<SAVE, FISHER, EWC>(p, save, g_in, fisher, precision, anchor, i, ewc_lam, terms, pv);
    float mv = load_as<float>(m[i]), vv = load_as<float>(v[i]), xv = AMSGRAD ? load_as<float>(vmax[i]) : 0.f;
    adamw_update<AMSGRAD>(pv, gv, mv, vv, xv, a);
    if (args.descent_coef)  // DESCENT, after the update (the same for every thread)
      pv = descended(meta, 10, t, i, g, load_as<float>(store_as<scalar_t>(pv)), args.descent_coef, args.n_sources);
    p[i] = store_as<scalar_t>(pv);  // round to nearest even for bf16/fp16
    m[i] = store_as<scalar_t>(mv);
    v[i] = store_as<scalar_t>(vv);
    if (AMSGRAD) vmax[i] = store_as<scalar_t>(xv);
  }
}

void adamw_step_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                     const std::vector<float>& ewc_lam, const AdamWDeviceArgs& args, bool save, bool fisher, bool ewc,
                     bool amsgrad, cudaStream_t stream) {
  auto run = [&](auto tag, auto SAVE, auto FISHER, auto EWC, auto AMSGRAD) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<kAdamWLists>(lists, sizes, ewc_lam, {}, [&](const TensorListMeta<kAdamWLists>& meta,
                                                                  int blocks) {
      adamw_kernel<scalar_t, SAVE(), FISHER(), EWC(), AMSGRAD()><<<blocks, kThreads, 0, stream>>>(meta, args);
      check(cudaGetLastError(), "adamw_kernel launch");
    });
  };
  auto by_flags = [&](auto tag) {
    with_flags([&](auto SAVE, auto FISHER, auto EWC, auto AMSGRAD) { run(tag, SAVE, FISHER, EWC, AMSGRAD); }, save,
               fisher, ewc, amsgrad);
  };
  by_dtype(dtype, by_flags);
}

}  // namespace cl_optim::cuda
