// cl_optim::grad_sq_norm and cl_optim::sam_perturb_ on the CPU: SAM's first pass.
#include "step_terms.h"

namespace cl_optim {

namespace {

// One chunk of the perturbation, the weight kind and the Fisher EMA as template parameters and
// restrict-qualified pointers passed by value: a branch-free loop the compiler vectorises.
template <int KIND, bool FISHER, typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void perturb_chunk(scalar_t* __restrict__ pp, const scalar_t* __restrict__ gp,
                                  scalar_t* __restrict__ sp, float* __restrict__ fp, int64_t begin, int64_t end,
                                  opmath_t scale, opmath_t eta, const GradTerms<opmath_t> gt) {
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t pv = static_cast<opmath_t>(pp[i]), gv = static_cast<opmath_t>(gp[i]);
    // The weight reads the running Fisher before this step's EMA update of it.
    const opmath_t weight_sq = sam_weight_sq<KIND, opmath_t>(
        pv, gv, KIND == kSamFisherRunning ? static_cast<opmath_t>(fp[i]) : opmath_t(0), eta);
    sp[i] = static_cast<scalar_t>(pv);  // exact (pv holds pp[i]); a plain copy of a bf16 struct would not vectorise
    if constexpr (FISHER) task_grad<true, false>(gv, pv, fp[i], opmath_t(0), opmath_t(0), opmath_t(0), gt);
    pp[i] = static_cast<scalar_t>(pv + sam_perturbation<opmath_t>(gv, weight_sq, scale));
  }
}

// One chunk's sum of (T g)^2 in double, with eight independent accumulators added in a fixed
// order: the adds overlap instead of waiting on each other, and the result does not depend on
// the thread count.
template <int KIND, typename scalar_t, typename opmath_t>
CLO_CPU_CLONES double norm_chunk(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ pp,
                                 const float* __restrict__ fp, int64_t begin, int64_t end, opmath_t eta) {
  auto term = [&](int64_t i) {
    return sam_norm_term<KIND, double, opmath_t>(KIND == kSamAsam ? static_cast<opmath_t>(pp[i]) : opmath_t(0),
                                                 static_cast<opmath_t>(gp[i]),
                                                 KIND == kSamFisherRunning ? static_cast<opmath_t>(fp[i]) : opmath_t(0),
                                                 eta);
  };
  constexpr int kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  for (; i < end; ++i) lanes[0] += term(i);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

}  // namespace

// sum_i ||T_i g_i||^2 with T_i of the SamWeight kind weighted[i] (empty: plain SAM); `fisher`
// (fp32) is read by the running-Fisher kind only. One partial per chunk, summed in chunk order:
// deterministic whatever the thread count. Accumulated and returned in fp64 (a 0-dim tensor), so
// that large finite gradients give a finite norm; only a non-finite gradient gives a non-finite
// result.
at::Tensor grad_sq_norm_cpu(at::TensorList grads, at::TensorList params, at::TensorList fisher,
                            c10::IntArrayRef weighted, double eta) {
  const int64_t n = check_grad_sq_norm(c10::DeviceType::CPU, grads, params, fisher, weighted).size();
  const auto out_dtype = at::TensorOptions().dtype(at::kDouble);
  if (n == 0) return at::zeros({}, out_dtype);
  Workspace ws(grads);
  std::vector<void*> g, p, f;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    const int kind = weighted.empty() ? kSamPlain : static_cast<int>(weighted[i]);
    g.push_back(ws.data(grads[i], false, i));
    p.push_back(kind == kSamAsam ? ws.data(params[i], false, i) : nullptr);
    f.push_back(kind == kSamFisherRunning ? ws.data(fisher[i], false, i) : nullptr);
    sizes.push_back(grads[i].numel());
  }
  const auto chunks = make_chunks(sizes);
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "grad_sq_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t eta_t = static_cast<opmath_t>(eta);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t index) {
      const scalar_t* gp = static_cast<const scalar_t*>(g[c.tensor]);
      const scalar_t* pp = static_cast<const scalar_t*>(p[c.tensor]);
      const float* fp = static_cast<const float*>(f[c.tensor]);
      const int kind = weighted.empty() ? kSamPlain : static_cast<int>(weighted[c.tensor]);
      with_sam_weight(kind, [&](auto KIND) {
        partial[index] = norm_chunk<KIND()>(gp, pp, fp, c.begin, c.end, eta_t);
      });
    });
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return at::scalar_tensor(total, out_dtype);
}

// save <- p; optionally F <- beta*F + (1-beta)*(g*inv_scale)^2 (when update_fisher and a
// `fisher` list is given); then p <- p + scale * T^2 * g, T^2 from the Fisher before its update,
// an element whose perturbation is not finite staying put.
void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saves, const at::Tensor& scale_t,
                     c10::IntArrayRef weighted, double eta, at::TensorList fisher, double fisher_beta,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& finite) {
  const int64_t n =
      check_sam_perturb(c10::DeviceType::CPU, params, grads, saves, scale_t, weighted, fisher, grad_scale, finite).size();
  if (n == 0) return;
  const double scale = scale_t.to(at::kDouble).item<double>();
  const double inv_scale = inv_scale_of(grad_scale);
  const bool update_fisher = scalar_or(finite, 1.0) != 0.0;
  Workspace ws(params);
  std::vector<void*> p, g, s, f;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    p.push_back(ws.data(params[i], true, i));
    g.push_back(ws.data(grads[i], false, i));
    s.push_back(ws.data(saves[i], true, i));
    if (!fisher.empty()) f.push_back(ws.data(fisher[i], true, i));
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
      scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      const scalar_t* __restrict__ gp = static_cast<const scalar_t*>(g[t]);
      scalar_t* __restrict__ sp = static_cast<scalar_t*>(s[t]);
      float* __restrict__ fp = f.empty() ? nullptr : static_cast<float*>(f[t]);
      const int kind = weighted.empty() ? kSamPlain : static_cast<int>(weighted[t]);
      with_sam_weight(kind, [&](auto KIND) {
        with_flags([&](auto FISHER) { perturb_chunk<KIND(), FISHER()>(pp, gp, sp, fp, c.begin, c.end, scale_t, eta_t, gt); },
                   update_fisher && fp != nullptr);
      });
    });
  });
  ws.finish();
}

}  // namespace cl_optim
