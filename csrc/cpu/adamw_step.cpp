// cl_optim::adamw_step_ on the CPU: torch.optim.AdamW's update with the optional terms of
// DESIGN.md §3 fused into one pass over each element (csrc/include/cl_optim/elementwise.h).
#include "step_terms.h"

namespace cl_optim {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, c10::ArrayRef<double> step_sizes,
                    c10::ArrayRef<double> bias_correction2_sqrts, at::TensorList restore_from, at::TensorList fisher,
                    const c10::List<std::optional<at::Tensor>>& ewc_precision,
                    const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                    double inv_scale, double clip_coef, double fisher_beta, bool maximize, double lr, double beta1,
                    double beta2, double eps, double weight_decay) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  check_cpu_list(grads.vec(), "grads", n);
  TORCH_CHECK(static_cast<int64_t>(exp_avgs.size()) == n && static_cast<int64_t>(exp_avg_sqs.size()) == n,
              "exp_avgs and exp_avg_sqs need one tensor per parameter");
  TORCH_CHECK(static_cast<int64_t>(step_sizes.size()) == n && static_cast<int64_t>(bias_correction2_sqrts.size()) == n,
              "step_sizes and bias_correction2_sqrts need one value per parameter");
  const bool amsgrad = !max_exp_avg_sqs.empty();
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(max_exp_avg_sqs.size()) == n, "max_exp_avg_sqs: wrong length");
  Workspace ws;
  std::vector<at::Tensor> p, g, m, v, vmax;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), "grad dtype differs from its parameter's");
    p.push_back(ws.use(params[i], true));
    g.push_back(ws.use(grads[i], false));
    m.push_back(ws.use(exp_avgs[i], true));
    v.push_back(ws.use(exp_avg_sqs[i], true));
    if (amsgrad) vmax.push_back(ws.use(max_exp_avg_sqs[i], true));
    sizes.push_back(params[i].numel());
  }
  StepTermInputs terms(ws, n, restore_from, fisher, ewc_precision, ewc_anchor, ewc_lam);
  const auto chunks = make_chunks(sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adamw_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    GradTerms<opmath_t> gt;
    gt.inv_scale = static_cast<opmath_t>(inv_scale);
    gt.clip_coef = static_cast<opmath_t>(clip_coef);
    gt.fisher_beta = static_cast<opmath_t>(fisher_beta);
    gt.fisher_one_minus_beta = static_cast<opmath_t>(1.0 - fisher_beta);
    gt.maximize = maximize;
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      const int64_t t = c.tensor;
      const AdamWParams<opmath_t> ap_{static_cast<opmath_t>(1.0 - lr * weight_decay),
                                      static_cast<opmath_t>(1.0 - beta1),
                                      static_cast<opmath_t>(beta2),
                                      static_cast<opmath_t>(1.0 - beta2),
                                      static_cast<opmath_t>(eps),
                                      static_cast<opmath_t>(step_sizes[t]),
                                      static_cast<opmath_t>(bias_correction2_sqrts[t])};
      scalar_t* pp = p[t].data_ptr<scalar_t>();
      const scalar_t* gp = g[t].data_ptr<scalar_t>();
      scalar_t* mp = m[t].data_ptr<scalar_t>();
      scalar_t* vp = v[t].data_ptr<scalar_t>();
      scalar_t* xp = amsgrad ? vmax[t].data_ptr<scalar_t>() : nullptr;
      const scalar_t* save = terms.save<scalar_t>(t);
      float* fp = terms.fisher_ptr(t);
      const bool ewc = terms.has_ewc(t);
      const float* ewc_a = ewc ? terms.precision[t].data_ptr<float>() : nullptr;
      const float* ewc_mu = ewc ? terms.anchor[t].data_ptr<float>() : nullptr;
      const opmath_t lam = static_cast<opmath_t>(ewc ? terms.lam[t] : 0.0);
      for (int64_t i = c.begin; i < c.end; ++i) {
        opmath_t pv = static_cast<opmath_t>(save ? save[i] : pp[i]);
        const opmath_t gv = task_grad<opmath_t>(static_cast<opmath_t>(gp[i]), pv, fp ? fp + i : nullptr, ewc,
                                                ewc ? static_cast<opmath_t>(ewc_a[i]) : opmath_t(0),
                                                ewc ? static_cast<opmath_t>(ewc_mu[i]) : opmath_t(0), lam, gt);
        opmath_t mv = static_cast<opmath_t>(mp[i]), vv = static_cast<opmath_t>(vp[i]);
        opmath_t xv = xp ? static_cast<opmath_t>(xp[i]) : opmath_t(0);
        adamw_update<opmath_t>(pv, gv, mv, vv, xp ? &xv : nullptr, ap_);
        pp[i] = static_cast<scalar_t>(pv);
        mp[i] = static_cast<scalar_t>(mv);
        vp[i] = static_cast<scalar_t>(vv);
        if (xp) xp[i] = static_cast<scalar_t>(xv);
      }
    });
  });
  ws.finish();
}

}  // namespace cl_optim
