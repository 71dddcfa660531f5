// cl_optim::adamw_step_ on the CPU: torch.optim.AdamW's update with the optional terms of
// DESIGN.md §3 fused into one pass over each element (csrc/include/cl_optim/elementwise.h).
#include "step_terms.h"

#include <cmath>

namespace cl_optim {
namespace {

// One chunk, with the flags as template parameters and restrict-qualified pointers passed by
// value: a loop the compiler can vectorise (no aliasing through lambda captures, no branches).
template <bool SAVE, bool FISHER, bool EWC, bool AMSGRAD, typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void adamw_chunk(scalar_t* __restrict__ pp, const scalar_t* __restrict__ gp, scalar_t* __restrict__ mp,
                 scalar_t* __restrict__ vp, scalar_t* __restrict__ xp, const scalar_t* __restrict__ save,
                 float* __restrict__ fp, const float* __restrict__ ewc_a, const float* __restrict__ ewc_mu,
                 opmath_t lam, int64_t begin, int64_t end, const GradTerms<opmath_t> gt,
                 const AdamWParams<opmath_t> ap) {
  for (int64_t i = begin; i < end; ++i) {
    opmath_t pv;
    const opmath_t gv = restored_task_grad<SAVE, FISHER, EWC>(pp, save, gp, fp, ewc_a, ewc_mu, i, lam, gt, pv);
    opmath_t mv = static_cast<opmath_t>(mp[i]), vv = static_cast<opmath_t>(vp[i]), xv = 0;
    if constexpr (AMSGRAD) xv = static_cast<opmath_t>(xp[i]);
    adamw_update<AMSGRAD>(pv, gv, mv, vv, xv, ap);
    if constexpr (AMSGRAD) xp[i] = static_cast<scalar_t>(xv);
    pp[i] = static_cast<scalar_t>(pv);
    mp[i] = static_cast<scalar_t>(mv);
    vp[i] = static_cast<scalar_t>(vv);
  }
}

}  // namespace

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList restore_from,
                    at::TensorList combine_from, const std::optional<at::Tensor>& combine_coef, at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& ewc_precision,
                    const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef, double fisher_beta, bool maximize, double lr,
                    double beta1, double beta2, double eps, double weight_decay) {
  // Every tensor is checked against its parameter before anything is read or written (the step
  // counts included: a rejected call counts nothing).
  const int64_t n = check_adamw_step(c10::DeviceType::CPU, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                     steps, restore_from, combine_from, combine_coef, fisher, ewc_precision,
                                     ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef)
                        .size();
  if (n == 0 || skip_step(found_inf, params, restore_from)) return;
  // Count this step, then torch.optim.AdamW's bias corrections of it, in double on the host.
  // Through the data pointer, not add_() / item(): two ATen calls per tensor would cost more than
  // the update itself on thousands of small tensors.
  std::vector<double> step_sizes(n), bias_correction2_sqrts(n);
  double last_t = -1.0;  // the counts are usually all equal: the two pow() once, not per tensor
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& step = steps[i];
    const double t = step.scalar_type() == at::kFloat ? static_cast<double>(++*step.data_ptr<float>())
                                                      : ++*step.data_ptr<double>();
    if (i == 0 || t != last_t) {
      step_sizes[i] = lr / (1.0 - std::pow(beta1, t));
      bias_correction2_sqrts[i] = std::sqrt(1.0 - std::pow(beta2, t));
      last_t = t;
    } else {
      step_sizes[i] = step_sizes[i - 1];
      bias_correction2_sqrts[i] = bias_correction2_sqrts[i - 1];
    }
  }
  const bool amsgrad = !max_exp_avg_sqs.empty();
  Workspace ws(params);
  std::vector<void*> p, g, m, v, vmax;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    p.push_back(ws.data(params[i], true, i));
    g.push_back(ws.data(grads[i], false, i));
    m.push_back(ws.data(exp_avgs[i], true, i));
    v.push_back(ws.data(exp_avg_sqs[i], true, i));
    if (amsgrad) vmax.push_back(ws.data(max_exp_avg_sqs[i], true, i));
    sizes.push_back(params[i].numel());
  }
  StepTermInputs terms(ws, n, restore_from, combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam,
                       grad_scale, clip_coef, fisher_beta, maximize);
  terms.set_lr(lr);
  const auto chunks = make_chunks(sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adamw_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto gt = terms.grad_terms<opmath_t>();
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      const int64_t t = c.tensor;
      const AdamWParams<opmath_t> ap_{static_cast<opmath_t>(1.0 - lr * weight_decay),
                                      static_cast<opmath_t>(1.0 - beta1),
                                      static_cast<opmath_t>(beta2),
                                      static_cast<opmath_t>(1.0 - beta2),
                                      static_cast<opmath_t>(eps),
                                      static_cast<opmath_t>(step_sizes[t]),
                                      static_cast<opmath_t>(bias_correction2_sqrts[t])};
      scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      const scalar_t* __restrict__ gp = static_cast<const scalar_t*>(g[t]);
      scalar_t* __restrict__ mp = static_cast<scalar_t*>(m[t]);
      scalar_t* __restrict__ vp = static_cast<scalar_t*>(v[t]);
      scalar_t* __restrict__ xp = amsgrad ? static_cast<scalar_t*>(vmax[t]) : nullptr;
      const scalar_t* __restrict__ save = terms.save<scalar_t>(t);
      float* __restrict__ fp = terms.fisher_ptr(t);
      const bool ewc = terms.has_ewc(t);
      const float* __restrict__ ewc_a = terms.precision_ptr(t);
      const float* __restrict__ ewc_mu = terms.anchor_ptr(t);
      const opmath_t lam = static_cast<opmath_t>(terms.lam_of(t));
      // Elements [begin, end) of the pointers shifted by `shift`, the gradient read from `grad`.
      const auto run = [&](const scalar_t* grad, int64_t shift, int64_t begin, int64_t end) {
        // Compile-time flags: each combination is its own branch-free, vectorisable loop.
        with_flags(
            [&](auto SAVE, auto FISHER, auto EWC, auto AMSGRAD) {
              adamw_chunk<SAVE(), FISHER(), EWC(), AMSGRAD()>(
                  shifted(pp, shift), grad, shifted(mp, shift), shifted(vp, shift), shifted(xp, shift),
                  shifted(save, shift), shifted(fp, shift), shifted(ewc_a, shift), shifted(ewc_mu, shift), lam, begin,
                  end, gt, ap_);
            },
            save != nullptr, fp != nullptr, ewc, xp != nullptr);
      };
      terms.over_chunk<scalar_t, opmath_t>(gp, pp, t, c.begin, c.end, run);
    });
  });
  ws.finish();
}

}  // namespace cl_optim
