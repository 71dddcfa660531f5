// The Fisher and EWC element ops on the CPU (DESIGN.md §3): fisher_accumulate_, ewc_grad_add_,
// ewc_penalty, ewc_consolidate_. Fisher, precision A and anchor mu are fp32; parameters and
// gradients any float type, computed in their op-math type.
#include <cl_optim/elementwise.h>

#include "../op_checks.h"
#include "multi_tensor.h"

namespace cl_optim {
namespace {

std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> sizes;
  for (const auto& t : ts) sizes.push_back(t.numel());
  return sizes;
}

}  // namespace

// F += weight * g^2
void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double weight) {
  const int64_t n = check_fisher_accumulate(c10::DeviceType::CPU, fisher, grads).size();
  if (n == 0) return;
  Workspace ws(grads);
  std::vector<void*> f, g;
  for (int64_t i = 0; i < n; ++i) {
    f.push_back(ws.data(fisher[i], true, i));
    g.push_back(ws.data(grads[i], false, i));
  }
  const auto chunks = make_chunks(numels(fisher));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fisher_accumulate_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t w = static_cast<opmath_t>(weight);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      float* __restrict__ fp = static_cast<float*>(f[c.tensor]);
      const scalar_t* __restrict__ gp = static_cast<scalar_t*>(g[c.tensor]);
      for (int64_t i = c.begin; i < c.end; ++i) fp[i] = fisher_accumulate<opmath_t>(fp[i], static_cast<opmath_t>(gp[i]), w);
    });
  });
  ws.finish();
}

// g += lam_t * A * (p - mu)
void ewc_grad_add_cpu(at::TensorList grads, at::TensorList params, at::TensorList precision, at::TensorList anchor,
                      c10::ArrayRef<double> lam) {
  const int64_t n = check_ewc_grad_add(c10::DeviceType::CPU, grads, params, precision, anchor, lam).size();
  if (n == 0) return;
  Workspace ws(params);
  std::vector<void*> g, p, a, mu;
  for (int64_t i = 0; i < n; ++i) {
    g.push_back(ws.data(grads[i], true, i));
    p.push_back(ws.data(params[i], false, i));
    a.push_back(ws.data(precision[i], false, i));
    mu.push_back(ws.data(anchor[i], false, i));
  }
  const auto chunks = make_chunks(numels(grads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "ewc_grad_add_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      const int64_t t = c.tensor;
      scalar_t* __restrict__ gp = static_cast<scalar_t*>(g[t]);
      const scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      const float* __restrict__ ap = static_cast<float*>(a[t]);
      const float* __restrict__ mp = static_cast<float*>(mu[t]);
      const opmath_t l = static_cast<opmath_t>(lam[t]);
      for (int64_t i = c.begin; i < c.end; ++i)
        gp[i] = static_cast<scalar_t>(ewc_pull<opmath_t>(static_cast<opmath_t>(gp[i]), static_cast<opmath_t>(pp[i]),
                                                         static_cast<opmath_t>(ap[i]), static_cast<opmath_t>(mp[i]), l));
    });
  });
  ws.finish();
}

// sum_t lam_t / 2 * sum A (p - mu)^2, in double with fixed-order chunk partials (fp64 scalar).
at::Tensor ewc_penalty_cpu(at::TensorList params, at::TensorList precision, at::TensorList anchor,
                           c10::ArrayRef<double> lam) {
  const int64_t n = check_ewc_penalty(c10::DeviceType::CPU, params, precision, anchor, lam).size();
  if (n == 0) return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  Workspace ws(params);
  std::vector<void*> p, a, mu;
  for (int64_t i = 0; i < n; ++i) {
    p.push_back(ws.data(params[i], false, i));
    a.push_back(ws.data(precision[i], false, i));
    mu.push_back(ws.data(anchor[i], false, i));
  }
  const auto chunks = make_chunks(numels(params));
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ewc_penalty", [&] {
    for_each_chunk(chunks, [&](const Chunk& c, int64_t index) {
      const int64_t t = c.tensor;
      const scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      const float* __restrict__ ap = static_cast<float*>(a[t]);
      const float* __restrict__ mp = static_cast<float*>(mu[t]);
      double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = c.begin; i < c.end; ++i)
        lanes[i & 7] += ewc_penalty_term<double>(static_cast<double>(pp[i]), ap[i], mp[i]);
      double sum = 0;
      for (double x : lanes) sum += x;
      partial[index] = 0.5 * lam[t] * sum;
    });
  });
  double total = 0;
  for (double x : partial) total += x;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

// A' = decay*A + weight*F; mu' = (decay*A*mu + weight*F*p)/A' (p where A' = 0) when
// weighted_anchor, else p. Returns, per tensor, sum of decay*A * weight*F / A' * (mu - p)^2 (the
// increment of the separate-penalty constant; 0 when not weighted_anchor), as fp64.
at::Tensor ewc_consolidate_cpu(at::TensorList precision, at::TensorList anchor, at::TensorList fisher,
                               at::TensorList params, double decay, double weight, bool weighted_anchor) {
  const int64_t n = check_ewc_consolidate(c10::DeviceType::CPU, precision, anchor, fisher, params).size();
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kDouble));
  Workspace ws(params);
  std::vector<void*> a, mu, f, p;
  for (int64_t i = 0; i < n; ++i) {
    a.push_back(ws.data(precision[i], true, i));
    mu.push_back(ws.data(anchor[i], true, i));
    f.push_back(ws.data(fisher[i], false, i));
    p.push_back(ws.data(params[i], false, i));
  }
  const auto chunks = make_chunks(numels(precision));
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ewc_consolidate_", [&] {
    const float d = static_cast<float>(decay), w = static_cast<float>(weight);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t index) {
      const int64_t t = c.tensor;
      float* __restrict__ ap = static_cast<float*>(a[t]);
      float* __restrict__ mp = static_cast<float*>(mu[t]);
      const float* __restrict__ fp = static_cast<float*>(f[t]);
      const scalar_t* __restrict__ pp = static_cast<scalar_t*>(p[t]);
      double gap = 0;
      with_flags(
          [&](auto WEIGHTED) {
            for (int64_t i = c.begin; i < c.end; ++i)
              gap += static_cast<double>(
                  ewc_consolidate<WEIGHTED()>(ap[i], mp[i], fp[i], static_cast<float>(pp[i]), d, w));
          },
          weighted_anchor);
      partial[index] = gap;
    });
  });
  std::vector<double> per_tensor(n, 0.0);
  for (size_t i = 0; i < chunks.size(); ++i) per_tensor[chunks[i].tensor] += partial[i];
  ws.finish();
  return at::tensor(per_tensor, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace cl_optim
