// Input checks of the fused ops that the CPU kernels (csrc/cpu) and the CUDA glue
// (bindings_cuda.cpp) share: one wording and one set of rules for both backends.
#pragma once

#include <ATen/ATen.h>
#include <cl_optim/elementwise.h>

#include <optional>

namespace cl_optim {

// The optional terms of an SGD/AdamW step: empty lists switch a term off; otherwise one entry per
// parameter, the running Fisher and the EWC buffers fp32, precision and anchor given together.
inline void check_step_terms(int64_t n, at::TensorList restore_from, at::TensorList fisher,
                             const c10::List<std::optional<at::Tensor>>& ewc_precision,
                             const c10::List<std::optional<at::Tensor>>& ewc_anchor) {
  TORCH_CHECK(restore_from.empty() || static_cast<int64_t>(restore_from.size()) == n, "restore_from: wrong length");
  TORCH_CHECK(fisher.empty() || static_cast<int64_t>(fisher.size()) == n, "fisher: wrong length");
  for (const auto& f : fisher) TORCH_CHECK(f.scalar_type() == at::kFloat, "the running Fisher must be fp32");
  TORCH_CHECK(ewc_precision.size() == ewc_anchor.size(), "ewc_precision and ewc_anchor differ in length");
  TORCH_CHECK(ewc_precision.empty() || static_cast<int64_t>(ewc_precision.size()) == n, "ewc: wrong length");
  for (size_t i = 0; i < ewc_precision.size(); ++i) {
    const std::optional<at::Tensor> a = ewc_precision.get(i), mu = ewc_anchor.get(i);
    TORCH_CHECK(a.has_value() == mu.has_value(), "EWC precision and anchor must be given together");
    if (a.has_value())
      TORCH_CHECK(a->scalar_type() == at::kFloat && mu->scalar_type() == at::kFloat, "EWC buffers must be fp32");
  }
}

// SAM's weight kinds: `weighted` empty (plain SAM) or one SamWeight kind per tensor; ASAM needs the
// parameters, the running-Fisher kind an fp32 `fisher` tensor of the gradient's size.
inline void check_sam_weights(c10::IntArrayRef weighted, at::TensorList grads, at::TensorList params,
                              at::TensorList fisher, int64_t n) {
  if (weighted.empty()) return;
  TORCH_CHECK(static_cast<int64_t>(weighted.size()) == n, "weighted needs one kind per tensor, got ",
              weighted.size(), " for ", n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(weighted[i] >= kSamPlain && weighted[i] <= kSamFisherRunning, "SAM weight kind ", weighted[i],
                " is not 0 (plain), 1 (ASAM), 2 (Fisher-SAM, batch) or 3 (Fisher-SAM, running Fisher)");
    if (weighted[i] == kSamAsam)
      TORCH_CHECK(static_cast<int64_t>(params.size()) == n && params[i].numel() == grads[i].numel(),
                  "ASAM needs the parameters, one per gradient and of its size");
    if (weighted[i] == kSamFisherRunning) {
      TORCH_CHECK(static_cast<int64_t>(fisher.size()) == n, "Fisher-SAM with the running Fisher needs `fisher`");
      TORCH_CHECK(fisher[i].scalar_type() == at::kFloat && fisher[i].numel() == grads[i].numel(),
                  "the running Fisher of tensor ", i, " must be fp32 with the parameter's size");
    }
  }
}

}  // namespace cl_optim
