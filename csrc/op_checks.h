// Input checks of the fused ops, shared by the CPU kernels (csrc/cpu) and the CUDA glue
// (bindings_cuda.cpp): one wording and one set of rules for both backends, the same rules as
// cl_optim/_checks.py applies for the Triton and Python backends.
//
// (cl_optim/_checks.py also takes an all-fp64 call — fp64 Fisher/EWC buffers next to fp64
// parameters — for the Python backends' fp64 reference; the kernels take fp32 buffers only.)
//
// Every op checks every tensor it will touch before it reads or writes any memory: each list is
// aligned with the op's lead list (the parameters, or the gradients for the ops without them),
// one tensor per lead tensor, of its shape, on its device, with the lead's dtype (or fp32 for the
// Fisher and EWC buffers), dense and strided. A mismatch is an error naming the op, the list, the
// index and both shapes — never a read or write past a tensor's end, which is what sizing every
// loop from the lead list would otherwise do. tests/test_op_checks.py calls each op with each
// kind of mismatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <cl_optim/elementwise.h>

#include <optional>
#include <string>

namespace cl_optim {

// Whether `t` can be walked as `like` is: element k of both at the same offset from their data
// pointer. True for equal strides over a dense layout (contiguous, channels_last, any permutation
// without gaps); a layout with gaps or repeats (a slice, an expanded view) is walked contiguously.
inline bool walks_as(const at::Tensor& t, const at::Tensor& like) {
  if (t.is_contiguous() && like.is_contiguous()) return true;  // the usual case, from cached flags
  if (like.is_non_overlapping_and_dense()) return t.strides() == like.strides();
  return t.is_contiguous();
}

// The entries of an optional-tensor list as pointers to the tensors the list holds (nullptr for
// None or an undefined tensor), valid while the list lives. list.get(i) copies each tensor: a
// reference-count round trip, an atomic on the tensor's own cache line, which after a step over
// many small tensors is cold (the EWC lists were read three times a step that way). Through the
// list's IValues (c10::List<IValue>'s const operator[] is a reference) nothing is copied.
inline std::vector<const at::Tensor*> optional_entries(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<const at::Tensor*> out(list.size(), nullptr);
  const c10::List<c10::IValue> values = c10::impl::toList(list);  // the same storage, no copies
  for (size_t i = 0; i < values.size(); ++i) {
    const c10::IValue& value = values[i];
    if (value.isTensor() && value.toTensor().defined()) out[i] = &value.toTensor();
  }
  return out;
}

enum class Want { kLike, kFloat };  // the dtype of an aligned list: the lead's, or fp32

class OpInputs {
 public:
  // `lead` (named `lead_name`): same dtype (a float type the backend runs), same device of
  // `device_type`, strided; `written` lists must not have overlapping elements (an expanded view).
  OpInputs(const char* op, const char* lead_name, at::TensorList lead, c10::DeviceType device_type, bool written)
      : op_(op), lead_name_(lead_name), lead_(lead), n_(static_cast<int64_t>(lead.size())) {
    if (n_ == 0) return;
    const at::Tensor& first = lead[0];
    TORCH_CHECK(first.defined(), op_, ": ", lead_name_, "[0] is undefined");
    device_ = first.device();
    dtype_ = first.scalar_type();
    TORCH_CHECK(device_.type() == device_type, op_, ": ", lead_name_, "[0] is on ", device_, "; this kernel runs on ",
                c10::DeviceTypeName(device_type), " tensors");
    const bool supported = dtype_ == at::kFloat || dtype_ == at::kHalf || dtype_ == at::kBFloat16 ||
                           (dtype_ == at::kDouble && device_type == c10::DeviceType::CPU);
    TORCH_CHECK(supported, op_, ": ", lead_name_, " are ", dtype_, "; the ", c10::DeviceTypeName(device_type),
                " kernels take ", device_type == c10::DeviceType::CPU ? "fp64, " : "", "fp32, fp16 or bf16 tensors");
    for (int64_t i = 0; i < n_; ++i) {
      const at::Tensor& t = lead[i];
      TORCH_CHECK(t.defined(), op_, ": ", lead_name_, "[", i, "] is undefined");
      TORCH_CHECK(t.scalar_type() == dtype_, op_, ": ", lead_name_, "[", i, "] is ", t.scalar_type(), ", ",
                  lead_name_, "[0] ", dtype_, " (one launch takes one dtype)");
      check_tensor(lead_name_, i, t, written);
    }
  }

  int64_t size() const { return n_; }
  const char* op() const { return op_; }
  at::Device device() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }

  // A list aligned with the lead: one tensor per lead tensor, of its shape (`optional`: or empty,
  // the term is off).
  void aligned(const char* name, at::TensorList list, Want want, bool optional, bool written) const {
    if (optional && list.empty()) return;
    count(name, list.size(), false);
    for (int64_t i = 0; i < n_; ++i) check_entry(name, i, list[i], want, written);
  }

  // The same for a list whose entries may be None (no term for that tensor).
  void aligned(const char* name, const c10::List<std::optional<at::Tensor>>& list, Want want, bool written) const {
    if (list.empty()) return;
    count(name, list.size(), false);
    const std::vector<const at::Tensor*> entries = optional_entries(list);
    for (int64_t i = 0; i < n_; ++i) {
      if (entries[i] != nullptr) check_entry(name, i, *entries[i], want, written);
    }
  }

  // Per-tensor values (lambdas, flags, kinds): one per lead tensor (`optional`: or none).
  void count(const char* name, size_t size, bool optional) const {
    if (optional && size == 0) return;
    TORCH_CHECK(static_cast<int64_t>(size) == n_, op_, ": ", name, " has ", size, " entries for ", n_, " ",
                lead_name_);
  }

  // A per-step scalar (loss scale, found_inf, clip coefficient, SAM's scale): one element.
  void scalar(const char* name, const std::optional<at::Tensor>& t) const {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->numel() == 1, op_, ": ", name, " must have one element, got shape ", t->sizes());
    TORCH_CHECK(t->layout() == at::kStrided, op_, ": ", name, " must be a dense tensor");
  }

 private:
  void check_entry(const char* name, int64_t i, const at::Tensor& t, Want want, bool written) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, "[", i, "] is undefined");
    const at::Tensor& lead = lead_[i];
    TORCH_CHECK(t.sizes() == lead.sizes(), op_, ": ", name, "[", i, "] has shape ", t.sizes(), ", ", lead_name_, "[",
                i, "] has shape ", lead.sizes(),
                " (state of another model, or a parameter that changed shape after its state was created)");
    const at::ScalarType expected = want == Want::kFloat ? at::kFloat : dtype_;
    TORCH_CHECK(t.scalar_type() == expected, op_, ": ", name, "[", i, "] is ", t.scalar_type(), ", expected ",
                expected, want == Want::kFloat ? " (the Fisher and EWC buffers are fp32)" : " (the dtype of its parameter)");
    check_tensor(name, i, t, written);
  }

  void check_tensor(const char* name, int64_t i, const at::Tensor& t, bool written) const {
    TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", name, "[", i, "] has layout ", t.layout(),
                "; the kernels take dense tensors");
    TORCH_CHECK(t.device() == device_, op_, ": ", name, "[", i, "] is on ", t.device(), ", ", lead_name_,
                "[0] on ", device_);
    TORCH_CHECK(!written || at::has_internal_overlap(t) != at::MemOverlap::Yes, op_, ": ", name, "[", i,
                "] is written but several of its elements share memory (an expanded view)");
  }

  const char* op_;
  const char* lead_name_;
  at::TensorList lead_;
  int64_t n_;
  at::Device device_{c10::DeviceType::CPU};
  at::ScalarType dtype_{at::kFloat};
};

// The optional terms of an SGD/AdamW step: empty lists switch a term off; otherwise one entry per
// parameter, the running Fisher and the EWC buffers fp32, precision and anchor given together,
// one lambda per parameter.
// COMBINE: `combine_coef` a dense floating-point tensor on the lead's device, 1-D with K + 1 entries
// (the first multiplies the gradient) or 2-D (2, K + 1) (row 0 COMBINE's, row 1 DESCENT's),
// `combine_from` K lists aligned with the lead, one after the other; no coefficients and no
// sources switch the terms off. Returns K (0 when off).
// DESCENT reads the gradient and COMBINE's sources in the update's pass; the CUDA kernels read at
// most 3 sources there (the glue forms a combination of more first, which would lose the raw
// gradient DESCENT needs), so every backend takes at most 3.
constexpr int64_t kMaxDescentSources = 3;

inline int64_t check_combine(const OpInputs& in, at::TensorList combine_from,
                             const std::optional<at::Tensor>& combine_coef) {
  const char* op = in.op();
  if (!combine_coef.has_value() || !combine_coef->defined()) {
    TORCH_CHECK(combine_from.empty(), op, ": combine_from has ", combine_from.size(),
                " entries but combine_coef is None");
    return 0;
  }
  const at::Tensor& c = *combine_coef;
  TORCH_CHECK(c.dim() == 1 || (c.dim() == 2 && c.size(0) == 2), op,
              ": combine_coef must be a 1-D tensor (K + 1 coefficients) or a 2-D one (2, K + 1) (COMBINE's, "
              "then DESCENT's), got ", c.sizes());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()) && c.layout() == at::kStrided, op,
              ": combine_coef must be a dense floating-point tensor, got ", c.scalar_type());
  const int64_t k = c.size(-1) - 1;
  TORCH_CHECK(k >= 0, op, ": combine_coef is empty (it needs K + 1 coefficients)");
  TORCH_CHECK(c.dim() == 1 || k <= kMaxDescentSources, op, ": DESCENT (a 2-D combine_coef) takes at most ",
              kMaxDescentSources, " sources, got ", k);
  TORCH_CHECK(static_cast<int64_t>(combine_from.size()) == k * in.size(), op, ": combine_from has ",
              combine_from.size(), " entries for ", k, " sources of ", in.size(),
              " params (source-major, K*n; K = len(combine_coef) - 1)");
  for (int64_t j = 0; j < k; ++j) {
    const std::string name = "combine_from (source " + std::to_string(j + 1) + ")";
    in.aligned(name.c_str(), combine_from.slice(j * in.size(), in.size()), Want::kLike, false, false);
  }
  TORCH_CHECK(in.size() == 0 || c.device() == in.device(), op, ": combine_coef is on ", c.device(), ", params[0] on ",
              in.device());
  return k;
}

inline void check_step_terms(const OpInputs& in, at::TensorList restore_from, at::TensorList combine_from,
                             const std::optional<at::Tensor>& combine_coef, at::TensorList fisher,
                             const c10::List<std::optional<at::Tensor>>& ewc_precision,
                             const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& clip_coef) {
  in.aligned("restore_from", restore_from, Want::kLike, true, false);
  check_combine(in, combine_from, combine_coef);
  in.aligned("fisher", fisher, Want::kFloat, true, true);
  in.aligned("ewc_precision", ewc_precision, Want::kFloat, false);
  in.aligned("ewc_anchor", ewc_anchor, Want::kFloat, false);
  TORCH_CHECK(ewc_precision.size() == ewc_anchor.size(), "ewc_precision and ewc_anchor differ in length");
  const std::vector<const at::Tensor*> precision = optional_entries(ewc_precision),
                                       anchor = optional_entries(ewc_anchor);
  for (size_t i = 0; i < precision.size(); ++i) {
    TORCH_CHECK((precision[i] != nullptr) == (anchor[i] != nullptr),
                "EWC precision and anchor must be given together (tensor ", i, ")");
  }
  in.count("ewc_lam", ewc_lam.size(), ewc_precision.empty());
  in.scalar("grad_scale", grad_scale);
  in.scalar("found_inf", found_inf);
  in.scalar("clip_coef", clip_coef);
}

// SAM's weight kinds: `weighted` empty (plain SAM) or one SamWeight kind per tensor; ASAM needs the
// parameters, the running-Fisher kind `fisher`. The lists themselves are checked by the caller
// (aligned with the gradients).
inline void check_sam_weights(const OpInputs& in, c10::IntArrayRef weighted, at::TensorList params,
                              at::TensorList fisher) {
  in.count("weighted", weighted.size(), true);
  for (size_t i = 0; i < weighted.size(); ++i) {
    TORCH_CHECK(weighted[i] >= kSamPlain && weighted[i] <= kSamFisherRunning, "SAM weight kind ", weighted[i],
                " is not 0 (plain), 1 (ASAM), 2 (Fisher-SAM, batch) or 3 (Fisher-SAM, running Fisher)");
    TORCH_CHECK(weighted[i] != kSamAsam || !params.empty(), "ASAM needs the parameters, one per gradient");
    TORCH_CHECK(weighted[i] != kSamFisherRunning || !fisher.empty(),
                "Fisher-SAM with the running Fisher needs `fisher`, one fp32 tensor per gradient");
  }
}

// ---------------------------------------------------------------------------------- per op

inline OpInputs check_sgd_step(c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                               at::TensorList momentum_buffers, c10::IntArrayRef buffer_ready,
                               at::TensorList restore_from, at::TensorList combine_from,
                               const std::optional<at::Tensor>& combine_coef, at::TensorList fisher,
                               const c10::List<std::optional<at::Tensor>>& ewc_precision,
                               const c10::List<std::optional<at::Tensor>>& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf,
                               const std::optional<at::Tensor>& clip_coef) {
  OpInputs in("sgd_step_", "params", params, device_type, true);
  in.aligned("grads", grads, Want::kLike, false, false);
  in.aligned("momentum_buffers", momentum_buffers, Want::kLike, true, true);
  if (!momentum_buffers.empty()) in.count("buffer_ready", buffer_ready.size(), false);
  check_step_terms(in, restore_from, combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef);
  return in;
}

// `steps_on_device`: the CUDA kernels count on the device (fp32 there), the CPU ones on the host.
inline OpInputs check_adamw_step(c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                 at::TensorList steps, at::TensorList restore_from, at::TensorList combine_from,
                                 const std::optional<at::Tensor>& combine_coef, at::TensorList fisher,
                                 const c10::List<std::optional<at::Tensor>>& ewc_precision,
                                 const c10::List<std::optional<at::Tensor>>& ewc_anchor,
                                 c10::ArrayRef<double> ewc_lam, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::Tensor>& clip_coef) {
  OpInputs in("adamw_step_", "params", params, device_type, true);
  in.aligned("grads", grads, Want::kLike, false, false);
  in.aligned("exp_avgs", exp_avgs, Want::kLike, false, true);
  in.aligned("exp_avg_sqs", exp_avg_sqs, Want::kLike, false, true);
  in.aligned("max_exp_avg_sqs", max_exp_avg_sqs, Want::kLike, true, true);
  in.count("steps", steps.size(), false);
  const bool on_device = device_type != c10::DeviceType::CPU;
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.layout() == at::kStrided, "adamw_step_: steps[", i,
                "] must be a one-element tensor (the step count)");
    if (on_device) {
      TORCH_CHECK(s.device() == in.device() && s.scalar_type() == at::kFloat, "adamw_step_: steps[", i, "] is ",
                  s.scalar_type(), " on ", s.device(), "; the ", c10::DeviceTypeName(device_type),
                  " kernels count steps in fp32 on the parameters' device (", in.device(), ")");
    } else {
      TORCH_CHECK(s.device().is_cpu() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                  "adamw_step_: steps[", i, "] is ", s.scalar_type(), " on ", s.device(),
                  "; the CPU kernels count steps in an fp32 (as torch keeps it) or fp64 CPU tensor");
    }
  }
  check_step_terms(in, restore_from, combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef);
  return in;
}

inline OpInputs check_grad_sq_norm(c10::DeviceType device_type, at::TensorList grads, at::TensorList params,
                                   at::TensorList fisher, c10::IntArrayRef weighted) {
  OpInputs in("grad_sq_norm", "grads", grads, device_type, false);
  in.aligned("params", params, Want::kLike, true, false);
  in.aligned("fisher", fisher, Want::kFloat, true, false);
  check_sam_weights(in, weighted, params, fisher);
  return in;
}

inline OpInputs check_sam_perturb(c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                                  at::TensorList saves, const at::Tensor& scale, c10::IntArrayRef weighted,
                                  at::TensorList fisher, const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& finite) {
  OpInputs in("sam_perturb_", "params", params, device_type, true);
  in.aligned("grads", grads, Want::kLike, false, false);
  in.aligned("saves", saves, Want::kLike, false, true);
  in.aligned("fisher", fisher, Want::kFloat, true, true);
  check_sam_weights(in, weighted, params, fisher);
  in.scalar("scale", scale);
  in.scalar("grad_scale", grad_scale);
  in.scalar("finite", finite);
  return in;
}

inline OpInputs check_fisher_accumulate(c10::DeviceType device_type, at::TensorList fisher, at::TensorList grads) {
  OpInputs in("fisher_accumulate_", "grads", grads, device_type, false);
  in.aligned("fisher", fisher, Want::kFloat, false, true);
  return in;
}

inline OpInputs check_ewc_grad_add(c10::DeviceType device_type, at::TensorList grads, at::TensorList params,
                                   at::TensorList precision, at::TensorList anchor, c10::ArrayRef<double> lam) {
  OpInputs in("ewc_grad_add_", "params", params, device_type, false);
  in.aligned("grads", grads, Want::kLike, false, true);
  in.aligned("precision", precision, Want::kFloat, false, false);
  in.aligned("anchor", anchor, Want::kFloat, false, false);
  in.count("lam", lam.size(), false);
  return in;
}

inline OpInputs check_ewc_penalty(c10::DeviceType device_type, at::TensorList params, at::TensorList precision,
                                  at::TensorList anchor, c10::ArrayRef<double> lam) {
  OpInputs in("ewc_penalty", "params", params, device_type, false);
  in.aligned("precision", precision, Want::kFloat, false, false);
  in.aligned("anchor", anchor, Want::kFloat, false, false);
  in.count("lam", lam.size(), false);
  return in;
}

inline OpInputs check_ewc_consolidate(c10::DeviceType device_type, at::TensorList precision, at::TensorList anchor,
                                      at::TensorList fisher, at::TensorList params) {
  OpInputs in("ewc_consolidate_", "params", params, device_type, false);
  in.aligned("precision", precision, Want::kFloat, false, true);
  in.aligned("anchor", anchor, Want::kFloat, false, true);
  in.aligned("fisher", fisher, Want::kFloat, false, false);
  return in;
}

// The multi-task ops take T task lists of n tensors one after the other in one `grads` list
// (task-major, T*n entries: a schema has no list of lists). The length n of each: from the
// total when `n` < 0 (task_gram), else the lead list's (task_combine_, whose lead is `out`).
inline int64_t task_list_length(const char* op, size_t size, int64_t num_tasks, int64_t n) {
  TORCH_CHECK(num_tasks >= 1, op, ": num_tasks must be at least 1, got ", num_tasks);
  const int64_t total = static_cast<int64_t>(size);
  if (n < 0) {
    TORCH_CHECK(total % num_tasks == 0, op, ": grads has ", total, " entries, not a multiple of num_tasks = ",
                num_tasks, " (T lists of n tensors, task-major)");
    return total / num_tasks;
  }
  TORCH_CHECK(total == num_tasks * n, op, ": grads has ", total, " entries for ", num_tasks, " tasks of ", n,
              " tensors (task-major, T*n)");
  return n;
}

// The lead is task 0's list (named "grads"); task t's list is aligned with it ("grads (task t)").
inline OpInputs check_task_gram(c10::DeviceType device_type, at::TensorList grads, int64_t num_tasks) {
  const int64_t n = task_list_length("task_gram", grads.size(), num_tasks, -1);
  OpInputs in("task_gram", "grads", grads.slice(0, n), device_type, false);
  for (int64_t t = 1; t < num_tasks; ++t) {
    const std::string name = "grads (task " + std::to_string(t) + ")";
    in.aligned(name.c_str(), grads.slice(t * n, n), Want::kLike, false, false);
  }
  return in;
}

// `out` leads; every task's list is aligned with it; `coefficients` is a dense 1-D floating-point
// tensor of T > 0 entries on out's device (T is its length).
inline OpInputs check_task_combine(c10::DeviceType device_type, at::TensorList out, at::TensorList grads,
                                   const at::Tensor& coefficients) {
  OpInputs in("task_combine_", "out", out, device_type, true);
  TORCH_CHECK(coefficients.defined(), "task_combine_: coefficients must be a 1-D tensor (one per task), got None");
  TORCH_CHECK(coefficients.dim() == 1, "task_combine_: coefficients must be a 1-D tensor (one per task), got ",
              coefficients.sizes());
  TORCH_CHECK(at::isFloatingType(coefficients.scalar_type()) && coefficients.layout() == at::kStrided,
              "task_combine_: coefficients must be a dense floating-point tensor, got ", coefficients.scalar_type());
  const int64_t num_tasks = coefficients.numel();
  TORCH_CHECK(num_tasks != 0, "task_combine_: coefficients is empty (no task)");
  const int64_t n = task_list_length("task_combine_", grads.size(), num_tasks, in.size());
  for (int64_t t = 0; t < num_tasks; ++t) {
    const std::string name = "grads (task " + std::to_string(t) + ")";
    in.aligned(name.c_str(), grads.slice(t * n, n), Want::kLike, false, false);
  }
  TORCH_CHECK(n == 0 || coefficients.device() == in.device(), "task_combine_: coefficients are on ",
              coefficients.device(), ", out[0] on ", in.device());
  return in;
}

// Whether the bytes two strided tensors span (from their lowest to their highest element, for
// non-negative strides) intersect: a conservative test of shared memory.
inline bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t extent = 0;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    const auto* begin = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(begin, begin + (extent + 1) * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// per_sample_sq_accumulate_: `out` a dense fp32 (M, N) matrix without shared elements; `deltas`
// (B, R, M) and `inputs` (B, R, N) dense, of one dtype the backend runs (fp64 also on the CPU),
// on out's device, any strides. The same rules and wording as cl_optim/_checks.py.
inline void check_per_sample_sq(c10::DeviceType device_type, const at::Tensor& out, const at::Tensor& deltas,
                                const at::Tensor& inputs) {
  constexpr const char* op = "per_sample_sq_accumulate_";
  const std::pair<const char*, const at::Tensor*> named[] = {{"out", &out}, {"deltas", &deltas}, {"inputs", &inputs}};
  const int64_t dims[] = {2, 3, 3};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& t = *named[k].second;
    TORCH_CHECK(t.defined(), op, ": ", named[k].first, " must be a tensor, got None");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", named[k].first, " has layout ", t.layout(),
                "; the kernels take dense tensors");
    TORCH_CHECK(t.dim() == dims[k], op, ": ", named[k].first, " must have ", dims[k], " dimensions, got shape ",
                t.sizes());
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out is ", out.scalar_type(),
              ", expected torch.float32 (the Fisher is fp32)");
  TORCH_CHECK(out.device().type() == device_type, op, ": out is on ", out.device(), "; this kernel runs on ",
              c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(out.is_non_overlapping_and_dense(), op,
              ": out must be a dense matrix whose elements do not share memory (contiguous or transposed), got "
              "strides ",
              out.strides());
  TORCH_CHECK(!out.requires_grad(), op, ": out requires grad; autograd cannot record this in-place sum (pass ",
              "a tensor that does not, such as its .detach())");
  for (int k = 1; k < 3; ++k) {
    const at::Tensor& t = *named[k].second;
    TORCH_CHECK(t.device() == out.device(), op, ": ", named[k].first, " is on ", t.device(), ", out on ", out.device());
    TORCH_CHECK(!bytes_overlap(out, t), op, ": out shares memory with ", named[k].first,
                " (out is written while they are still read)");
    const auto dtype = t.scalar_type();
    const bool supported = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                           (dtype == at::kDouble && device_type == c10::DeviceType::CPU);
    TORCH_CHECK(supported, op, ": ", named[k].first, " is ", dtype, "; the ", c10::DeviceTypeName(device_type),
                " kernels take ", device_type == c10::DeviceType::CPU ? "fp64, " : "", "fp32, fp16 or bf16 tensors");
  }
  TORCH_CHECK(deltas.scalar_type() == inputs.scalar_type(), op, ": deltas are ", deltas.scalar_type(), ", inputs ",
              inputs.scalar_type(), " (one dtype per call)");
  // The GPU kernels put out's rows on the grid's second axis (at most 65535 tiles of 32).
  TORCH_CHECK(device_type != c10::DeviceType::CUDA || deltas.size(2) <= 65535 * 32, op, ": out has ",
              deltas.size(2), " rows; the GPU kernels take at most 2097120");
  TORCH_CHECK(inputs.size(0) == deltas.size(0) && inputs.size(1) == deltas.size(1) &&
                  out.size(0) == deltas.size(2) && out.size(1) == inputs.size(2),
              op, ": shapes do not match: out ", out.sizes(), ", deltas ", deltas.sizes(), " (B, R, M), inputs ",
              inputs.sizes(), " (B, R, N); out must be (M, N) and both inputs share B and R");
}

}  // namespace cl_optim
