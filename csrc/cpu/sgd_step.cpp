// cl_optim::sgd_step_ on the CPU: torch.optim.SGD's update with the optional terms of
// DESIGN.md §3 fused into one pass over each element (csrc/include/cl_optim/elementwise.h).
#include "step_terms.h"

namespace cl_optim {
namespace {

// One chunk, with the flags as template parameters and restrict-qualified pointers passed by
// value: a loop the compiler can vectorise (no aliasing through lambda captures, no branches).
template <bool SAVE, bool FISHER, bool EWC, bool MOMENTUM, bool READY, typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void sgd_chunk(scalar_t* __restrict__ pp, const scalar_t* __restrict__ gp, scalar_t* __restrict__ bp,
               const scalar_t* __restrict__ save, float* __restrict__ fp, const float* __restrict__ ap,
               const float* __restrict__ mp, opmath_t lam, int64_t begin, int64_t end,
               const GradTerms<opmath_t> gt, const SgdParams<opmath_t> sp) {
  for (int64_t i = begin; i < end; ++i) {
    opmath_t pv;
    const opmath_t gv = restored_task_grad<SAVE, FISHER, EWC>(pp, save, gp, fp, ap, mp, i, lam, gt, pv);
    opmath_t bv = 0;
    if constexpr (MOMENTUM) bv = static_cast<opmath_t>(bp[i]);
    sgd_update<MOMENTUM>(pv, gv, bv, READY, sp);
    if constexpr (MOMENTUM) bp[i] = static_cast<scalar_t>(bv);
    pp[i] = static_cast<scalar_t>(pv);
  }
}

}  // namespace

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  c10::IntArrayRef buffer_ready, at::TensorList restore_from, at::TensorList combine_from,
                  const std::optional<at::Tensor>& combine_coef, at::TensorList fisher,
                  const c10::List<std::optional<at::Tensor>>& ewc_precision,
                  const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& clip_coef, double fisher_beta, bool maximize, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov) {
  // Every tensor is checked against its parameter before anything is read or written.
  const int64_t n = check_sgd_step(c10::DeviceType::CPU, params, grads, momentum_buffers, buffer_ready, restore_from,
                                   combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale,
                                   found_inf, clip_coef)
                        .size();
  if (n == 0) return;
  const bool has_momentum = !momentum_buffers.empty();
  if (skip_step(found_inf, params, restore_from)) {
    // A skipped first step leaves zeros, not uninitialised memory, in the buffers it was to
    // start; the next step then forms momentum * 0 + (1 - dampening) * g (= g: dampening 0).
    for (int64_t i = 0; has_momentum && i < n; ++i)
      if (buffer_ready[i] == 0) momentum_buffers[i].zero_();
    return;
  }
  Workspace ws(params);
  std::vector<void*> p, g, buf;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    p.push_back(ws.data(params[i], true, i));
    g.push_back(ws.data(grads[i], false, i));
    if (has_momentum) buf.push_back(ws.data(momentum_buffers[i], true, i));
    sizes.push_back(params[i].numel());
  }
  StepTermInputs terms(ws, n, restore_from, combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam,
                       grad_scale, clip_coef, fisher_beta, maximize);
  terms.set_lr(lr);
  const auto chunks = make_chunks(sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto gt = terms.grad_terms<opmath_t>();
    const SgdParams<opmath_t> sp{static_cast<opmath_t>(lr), static_cast<opmath_t>(momentum),
                                 static_cast<opmath_t>(1.0 - dampening), static_cast<opmath_t>(weight_decay),
                                 nesterov};
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      const int64_t t = c.tensor;
      scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      const scalar_t* __restrict__ gp = static_cast<const scalar_t*>(g[t]);
      scalar_t* __restrict__ bp = has_momentum ? static_cast<scalar_t*>(buf[t]) : nullptr;
      const scalar_t* __restrict__ save = terms.save<scalar_t>(t);
      float* __restrict__ fp = terms.fisher_ptr(t);
      const bool ewc = terms.has_ewc(t);
      const float* __restrict__ ap = terms.precision_ptr(t);
      const float* __restrict__ mp = terms.anchor_ptr(t);
      const opmath_t lam = static_cast<opmath_t>(terms.lam_of(t));
      const bool ready = has_momentum && buffer_ready[t] != 0;
      // Elements [begin, end) of the pointers shifted by `shift`, the gradient read from `grad`.
      const auto run = [&](const scalar_t* grad, int64_t shift, int64_t begin, int64_t end) {
        // Compile-time flags: each combination is its own branch-free, vectorisable loop.
        with_flags(
            [&](auto SAVE, auto FISHER, auto EWC, auto MOMENTUM, auto READY) {
              sgd_chunk<SAVE(), FISHER(), EWC(), MOMENTUM(), READY()>(
                  shifted(pp, shift), grad, shifted(bp, shift), shifted(save, shift), shifted(fp, shift),
                  shifted(ap, shift), shifted(mp, shift), lam, begin, end, gt, sp);
            },
            save != nullptr, fp != nullptr, ewc, bp != nullptr, ready);
      };
      terms.over_chunk<scalar_t, opmath_t>(gp, pp, t, c.begin, c.end, run);
    });
  });
  ws.finish();
}

}  // namespace cl_optim
