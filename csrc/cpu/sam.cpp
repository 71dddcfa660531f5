// cl_optim::grad_sq_norm and cl_optim::sam_perturb_ on the CPU: SAM's first pass.
#include <cl_optim/elementwise.h>

#include "multi_tensor.h"

namespace cl_optim {

// sum_i ||T_i g_i||^2, T_i = |p_i| + eta where weighted[i], else 1. One partial per chunk, summed
// in chunk order: deterministic whatever the thread count. Accumulated in double; returned as a
// 0-dim fp32 tensor (fp64 for fp64 gradients). A non-finite gradient gives a non-finite result.
at::Tensor grad_sq_norm_cpu(at::TensorList grads, at::TensorList params, c10::IntArrayRef weighted, double eta) {
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto out_dtype = (n > 0 && grads[0].scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  if (n == 0) return at::zeros({}, at::TensorOptions().dtype(out_dtype));
  TORCH_CHECK(weighted.empty() || (static_cast<int64_t>(weighted.size()) == n && static_cast<int64_t>(params.size()) == n),
              "weighted and params need one entry per gradient");
  Workspace ws;
  std::vector<at::Tensor> g, p;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    g.push_back(ws.use(grads[i], false));
    p.push_back(weighted.empty() ? at::Tensor() : ws.use(params[i], false));
    sizes.push_back(grads[i].numel());
  }
  const auto chunks = make_chunks(sizes);
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "grad_sq_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t eta_t = static_cast<opmath_t>(eta);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t index) {
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const bool w = !weighted.empty() && weighted[c.tensor] != 0;
      const scalar_t* pp = w ? p[c.tensor].data_ptr<scalar_t>() : nullptr;
      // Eight independent accumulators, added in a fixed order: the adds overlap instead of
      // waiting on each other, and the result is the same for every thread count.
      constexpr int kLanes = 8;
      double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = c.begin;
      for (; i + kLanes <= c.end; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const opmath_t tg =
              asam_weight<opmath_t>(w ? static_cast<opmath_t>(pp[i + l]) : opmath_t(0), w, eta_t) *
              static_cast<opmath_t>(gp[i + l]);
          lanes[l] += static_cast<double>(tg) * static_cast<double>(tg);
        }
      }
      for (; i < c.end; ++i) {
        const opmath_t tg = asam_weight<opmath_t>(w ? static_cast<opmath_t>(pp[i]) : opmath_t(0), w, eta_t) *
                            static_cast<opmath_t>(gp[i]);
        lanes[0] += static_cast<double>(tg) * static_cast<double>(tg);
      }
      double sum = 0.0;
      for (int l = 0; l < kLanes; ++l) sum += lanes[l];
      partial[index] = sum;
    });
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return at::scalar_tensor(total, at::TensorOptions().dtype(out_dtype));
}

// save <- p; optionally F <- beta*F + (1-beta)*(g*inv_scale)^2 (when update_fisher); then
// p <- p + scale * T^2 * g, an element whose perturbation is not finite staying put.
void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saves, double scale,
                     c10::IntArrayRef weighted, double eta, at::TensorList fisher, double fisher_beta,
                     double inv_scale, bool update_fisher) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(saves.size()) == n,
              "grads and saves need one tensor per parameter");
  TORCH_CHECK(weighted.empty() || static_cast<int64_t>(weighted.size()) == n, "weighted: wrong length");
  TORCH_CHECK(fisher.empty() || static_cast<int64_t>(fisher.size()) == n, "fisher: wrong length");
  Workspace ws;
  std::vector<at::Tensor> p, g, s, f;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    p.push_back(ws.use(params[i], true));
    g.push_back(ws.use(grads[i], false));
    s.push_back(ws.use(saves[i], true));
    if (!fisher.empty()) {
      TORCH_CHECK(fisher[i].scalar_type() == at::kFloat, "the running Fisher must be fp32");
      f.push_back(ws.use(fisher[i], true));
    }
    sizes.push_back(params[i].numel());
  }
  const auto chunks = make_chunks(sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sam_perturb_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto gt = make_grad_terms<opmath_t>(static_cast<opmath_t>(inv_scale), opmath_t(1), false,
                                              static_cast<opmath_t>(fisher_beta),
                                              static_cast<opmath_t>(1.0 - fisher_beta));
    const opmath_t scale_t = static_cast<opmath_t>(scale), eta_t = static_cast<opmath_t>(eta);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      const int64_t t = c.tensor;
      scalar_t* __restrict__ pp = p[t].data_ptr<scalar_t>();
      const scalar_t* __restrict__ gp = g[t].data_ptr<scalar_t>();
      scalar_t* __restrict__ sp = s[t].data_ptr<scalar_t>();
      float* __restrict__ fp = (update_fisher && !f.empty()) ? f[t].data_ptr<float>() : nullptr;
      const bool w = !weighted.empty() && weighted[t] != 0;
      with_flags(
          [&](auto FISHER, auto WEIGHTED) {
            for (int64_t i = c.begin; i < c.end; ++i) {
              const opmath_t pv = static_cast<opmath_t>(pp[i]), gv = static_cast<opmath_t>(gp[i]);
              sp[i] = pp[i];
              if constexpr (FISHER) task_grad<true, false>(gv, pv, fp[i], opmath_t(0), opmath_t(0), opmath_t(0), gt);
              const opmath_t weight = asam_weight<opmath_t>(pv, WEIGHTED, eta_t);
              pp[i] = static_cast<scalar_t>(pv + sam_perturbation<opmath_t>(gv, weight, scale_t));
            }
          },
          fp != nullptr, w);
    });
  });
  ws.finish();
}

}  // namespace cl_optim
