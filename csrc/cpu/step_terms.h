// The optional-term inputs shared by the SGD and AdamW CPU steps: resolved once per call into
// contiguous tensors, then read per element through raw pointers.
#pragma once

#include <cl_optim/elementwise.h>

#include "../op_checks.h"
#include "combine.h"
#include "multi_tensor.h"

namespace cl_optim {

// AMP's 1/grad_scale as GradScaler.unscale_ rounds it (reciprocal in double, then fp32), so a
// fused unscale equals unscale_ + step; 1 when AMP is off.
inline double inv_scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() && grad_scale->defined()
             ? static_cast<double>(static_cast<float>(1.0 / scalar_or(grad_scale, 1.0)))
             : 1.0;
}

// AMP's skip decision: found_inf non-zero (or NaN). The step then only restores the weights
// (RESTORE), so a skipped SAM step leaves no perturbed weight behind. Read here, on the host: free
// for CPU tensors. Called after the inputs are checked: it writes the parameters.
inline bool skip_step(const std::optional<at::Tensor>& found_inf, at::TensorList params, at::TensorList restore_from) {
  if (scalar_or(found_inf, 0.0) == 0.0) return false;  // NaN != 0: skipped
  for (size_t i = 0; i < restore_from.size() && i < params.size(); ++i) params[i].copy_(restore_from[i]);
  return true;
}

// `p + by`, or nullptr for an absent tensor (a flag keeps it unread).
template <typename T>
inline T* shifted(T* p, int64_t by) {
  return p == nullptr ? nullptr : p + by;
}

struct StepTermInputs {
  std::vector<void*> restore, fisher, precision, anchor;  // Workspace::data() pointers
  std::vector<double> lam;
  std::vector<bool> has_term;  // EWC: whether tensor t has a precision and an anchor
  double inv_scale, clip_coef, fisher_beta;
  bool maximize;
  // COMBINE: the K source lists (entry j * n + t is source j + 1 of tensor t) and the K + 1
  // coefficients, read on the host (a CPU tensor: free); empty coefficients: the term is off.
  int64_t n_tensors;
  std::vector<void*> sources;
  std::vector<double> combine_coef;
  // DESCENT (a 2-D combine_coef's row 1, d_j): after the update, p <- p + sum_j c_j x_j with
  // x_0 the raw gradient, as task_combine_ accumulates, c_j = d_j * lr * (1/grad_scale) in double
  // (set_lr); empty: the term is off.
  std::vector<double> descent_raw, descent_coef;

  StepTermInputs(Workspace& ws, int64_t n, at::TensorList restore_from, at::TensorList combine_from,
                 const std::optional<at::Tensor>& combine_coef_in, at::TensorList fisher_in,
                 const c10::List<std::optional<at::Tensor>>& ewc_precision,
                 const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& clip_coef_in,
                 double fisher_beta_in, bool maximize_in)
      : inv_scale(inv_scale_of(grad_scale)),
        clip_coef(scalar_or(clip_coef_in, 1.0)),
        fisher_beta(fisher_beta_in),
        maximize(maximize_in),
        n_tensors(n) {
    for (size_t i = 0; i < restore_from.size(); ++i) restore.push_back(ws.data(restore_from[i], false, i));
    if (combine_coef_in.has_value() && combine_coef_in->defined()) {
      const at::Tensor c = combine_coef_in->to(at::kDouble).contiguous();
      const int64_t row = c.size(-1);  // K + 1; a 2-D tensor holds COMBINE's row, then DESCENT's
      combine_coef.assign(c.data_ptr<double>(), c.data_ptr<double>() + row);
      if (c.dim() == 2) descent_raw.assign(c.data_ptr<double>() + row, c.data_ptr<double>() + 2 * row);
      for (size_t i = 0; i < combine_from.size(); ++i) sources.push_back(ws.data(combine_from[i], false, i % n));
    }
    for (size_t i = 0; i < fisher_in.size(); ++i) fisher.push_back(ws.data(fisher_in[i], true, i));
    const std::vector<const at::Tensor*> a = optional_entries(ewc_precision), mu = optional_entries(ewc_anchor);
    for (size_t i = 0; i < a.size(); ++i) {
      const bool term = a[i] != nullptr;
      TORCH_INTERNAL_ASSERT(!term || mu[i] != nullptr, "EWC precision without its anchor (checked before)");
      precision.push_back(term ? ws.data(*a[i], false, i) : nullptr);
      anchor.push_back(term ? ws.data(*mu[i], false, i) : nullptr);
      has_term.push_back(term);
      lam.push_back(ewc_lam[i]);
    }
  }

  bool combining() const { return !combine_coef.empty(); }
  bool descending() const { return !descent_coef.empty(); }

  // DESCENT's coefficients for this step's learning rate, formed as the Python backends form them.
  void set_lr(double lr) {
    descent_coef.clear();
    for (double d : descent_raw) descent_coef.push_back(d * lr * inv_scale);  // inv_scale: 1 without AMP
  }

  // COMBINE of elements [begin, begin + len) of tensor t (len <= kCombineBlock) into `out`:
  // 0 + c_0 g + c_1 x_1 + ... in opmath, rounded to the gradient's dtype, as task_combine_ writes it.
  template <typename scalar_t, typename opmath_t>
  void combine(scalar_t* out, const scalar_t* grad, int64_t t, int64_t begin, int64_t len) const {
    alignas(64) opmath_t acc[kCombineBlock];
    combine_start<scalar_t, opmath_t>(acc, nullptr, len, false);
    combine_add<scalar_t, opmath_t>(acc, grad + begin, static_cast<opmath_t>(combine_coef[0]), len);
    for (size_t j = 1; j < combine_coef.size(); ++j)
      combine_add<scalar_t, opmath_t>(acc, static_cast<const scalar_t*>(sources[(j - 1) * n_tensors + t]) + begin,
                                      static_cast<opmath_t>(combine_coef[j]), len);
    combine_store<scalar_t, opmath_t>(out, acc, len);
  }

  // DESCENT of elements [begin, begin + len) of tensor t (len <= kCombineBlock), the updated
  // parameter still in L1: param + c_0 g + c_1 x_1 + ... in opmath, rounded to the parameter's dtype.
  template <typename scalar_t, typename opmath_t>
  void descend(scalar_t* param, const scalar_t* grad, int64_t t, int64_t begin, int64_t len) const {
    alignas(64) opmath_t acc[kCombineBlock];
    combine_start<scalar_t, opmath_t>(acc, param + begin, len, true);
    combine_add<scalar_t, opmath_t>(acc, grad + begin, static_cast<opmath_t>(descent_coef[0]), len);
    for (size_t j = 1; j < descent_coef.size(); ++j)
      combine_add<scalar_t, opmath_t>(acc, static_cast<const scalar_t*>(sources[(j - 1) * n_tensors + t]) + begin,
                                      static_cast<opmath_t>(descent_coef[j]), len);
    combine_store<scalar_t, opmath_t>(param + begin, acc, len);
  }

  // Runs `run(grad, shift, begin, end)` over elements [begin, end) of tensor t's chunk, the other
  // pointers shifted by `shift`: the chunk with .grad as it is, or with COMBINE a sub-block at a
  // time, its combined gradient formed in L1 first, and DESCENT applied to `param` (the updated
  // parameter) right after each sub-block's update.
  template <typename scalar_t, typename opmath_t, typename Run>
  void over_chunk(const scalar_t* grad, scalar_t* param, int64_t t, int64_t begin, int64_t end, const Run& run) const {
    if (!combining()) return run(grad, 0, begin, end);
    alignas(64) scalar_t combined[kCombineBlock];
    for (int64_t b = begin; b < end; b += kCombineBlock) {
      const int64_t len = std::min(kCombineBlock, end - b);
      combine<scalar_t, opmath_t>(combined, grad, t, b, len);
      run(combined, b, 0, len);
      if (descending()) descend<scalar_t, opmath_t>(param, grad, t, b, len);
    }
  }

  template <typename scalar_t>
  const scalar_t* save(int64_t t) const {
    return restore.empty() ? nullptr : static_cast<const scalar_t*>(restore[t]);
  }
  float* fisher_ptr(int64_t t) const { return fisher.empty() ? nullptr : static_cast<float*>(fisher[t]); }
  bool has_ewc(int64_t t) const { return !has_term.empty() && has_term[t]; }
  const float* precision_ptr(int64_t t) const { return has_ewc(t) ? static_cast<const float*>(precision[t]) : nullptr; }
  const float* anchor_ptr(int64_t t) const { return has_ewc(t) ? static_cast<const float*>(anchor[t]) : nullptr; }
  double lam_of(int64_t t) const { return has_ewc(t) ? lam[t] : 0.0; }

  // The scalar terms in op-math; 1 - beta is formed in double and rounded once, as the oracle does.
  template <typename T>
  GradTerms<T> grad_terms() const {
    return make_grad_terms<T>(static_cast<T>(inv_scale), static_cast<T>(clip_coef), maximize,
                              static_cast<T>(fisher_beta), static_cast<T>(1.0 - fisher_beta));
  }
};

}  // namespace cl_optim
