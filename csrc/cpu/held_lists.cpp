// cl_optim.HeldLists (torch.classes.cl_optim.HeldLists): the tensor lists of one bucket's op call,
// held on the C++ side from step to step.
//
// Why: handing a Python list of tensors to an op converts it element by element (unpack, IValue,
// reference counts). An AdamW step over 2000 tensors takes six such lists: 2.4 ms before a byte is
// updated on the AMD EPYC of bench/results, as much as the update of 2000 x 4096 fp32 elements.
// Held here, a list is converted once, when the Python side (cl_optim/_held.py) sees a list that
// is not element for element the one it holds, and a step hands over its gradients (new tensors
// every step after zero_grad(set_to_none=True)) and its scalars.
//
// Each call goes to the same CPU function the dispatcher would run (csrc/cpu/ops_cpu.h), with
// the same input checks, so a held call and a list call give the same numbers and the same
// refusals. What the dispatcher would do before that function is not done here, so a held call
// declines (returns false, or None for the norm, having touched nothing) when a tensor is not a
// plain strided CPU tensor: a negative or conjugate view or a zero tensor (materialised by their
// fallbacks), a tensor subclass or functorch wrapper (its __torch_dispatch__), no storage. The
// caller then makes the list call. The gradients come in as an argument rather than read from
// .grad here: the call runs without the GIL, and another thread replacing a .grad meanwhile must
// not free a tensor the kernel reads.
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cl_optim/elementwise.h>

#include "ops_cpu.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace cl_optim {
namespace {

// The slots of a held call, named as the ops' schemas name their lists (cl_optim/_held.py has
// the same numbers).
enum Slot : int64_t {
  kParams = 0,
  kExpAvgs,
  kExpAvgSqs,
  kMaxExpAvgSqs,
  kSteps,
  kRestoreFrom,
  kCombineFrom,
  kFisher,
  kSaves,
  kMomentumBuffers,
  kSlots
};

// What the CPU kernel can read as it is: see the file comment. (Undefined tensors pass: the op's
// checks refuse them in the same words as a list call.)
bool plain(const at::Tensor& t) {
  if (!t.defined()) return true;
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Negative,
                                            c10::DispatchKey::Conjugate, c10::DispatchKey::ZeroTensor});
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_quantized() && t.has_storage() &&
         !t.key_set().has_any(wrapped);
}

bool all_plain(at::TensorList tensors) {
  return std::all_of(tensors.begin(), tensors.end(), plain);
}

bool all_plain(const OptionalTensors& tensors) {
  for (const std::optional<at::Tensor> t : tensors)
    if (t.has_value() && !plain(*t)) return false;
  return true;
}

struct HeldLists : torch::CustomClassHolder {
  std::vector<std::vector<at::Tensor>> lists = std::vector<std::vector<at::Tensor>>(kSlots);
  OptionalTensors ewc_precision, ewc_anchor;
  std::vector<double> ewc_lam;
  std::vector<int64_t> buffer_ready;

  // Holds `tensors` in `slot` and returns true, or returns false (holding nothing new) when one
  // is not plain.
  bool hold(int64_t slot, std::vector<at::Tensor> tensors) {
    TORCH_CHECK(slot >= 0 && slot < kSlots, "HeldLists.hold: no slot ", slot);
    if (!all_plain(tensors)) return false;
    lists[slot] = std::move(tensors);
    return true;
  }

  bool hold_ewc(OptionalTensors precision, OptionalTensors anchor, std::vector<double> lam) {
    if (!all_plain(precision) || !all_plain(anchor)) return false;
    ewc_precision = std::move(precision);
    ewc_anchor = std::move(anchor);
    ewc_lam = std::move(lam);
    return true;
  }

  void hold_buffer_ready(std::vector<int64_t> ready) { buffer_ready = std::move(ready); }

  // The parameters again at each call: `p.data = ...` changes a held tensor in place.
  bool callable(const std::vector<at::Tensor>& grads) const { return all_plain(grads) && all_plain(lists[kParams]); }

  bool adamw_step(std::vector<at::Tensor> grads, const OptionalTensor& combine_coef, const OptionalTensor& grad_scale,
                  const OptionalTensor& found_inf, const OptionalTensor& clip_coef, double fisher_beta, bool maximize,
                  double lr, double beta1, double beta2, double eps, double weight_decay) {
    if (!callable(grads)) return false;
    RECORD_FUNCTION("cl_optim::adamw_step_ (held lists)", std::vector<c10::IValue>());
    adamw_step_cpu(lists[kParams], grads, lists[kExpAvgs], lists[kExpAvgSqs], lists[kMaxExpAvgSqs], lists[kSteps],
                   lists[kRestoreFrom], lists[kCombineFrom], combine_coef, lists[kFisher], ewc_precision, ewc_anchor,
                   ewc_lam, grad_scale, found_inf, clip_coef, fisher_beta, maximize, lr, beta1, beta2, eps,
                   weight_decay);
    return true;
  }

  bool sgd_step(std::vector<at::Tensor> grads, const OptionalTensor& combine_coef, const OptionalTensor& grad_scale,
                const OptionalTensor& found_inf, const OptionalTensor& clip_coef, double fisher_beta, bool maximize,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
    if (!callable(grads)) return false;
    RECORD_FUNCTION("cl_optim::sgd_step_ (held lists)", std::vector<c10::IValue>());
    sgd_step_cpu(lists[kParams], grads, lists[kMomentumBuffers], buffer_ready, lists[kRestoreFrom],
                 lists[kCombineFrom], combine_coef, lists[kFisher], ewc_precision, ewc_anchor, ewc_lam, grad_scale,
                 found_inf, clip_coef, fisher_beta, maximize, lr, momentum, dampening, weight_decay, nesterov);
    return true;
  }

  // The parameters and the Fisher go down only where a weight kind reads them, as the Python
  // caller of the op hands them (cl_optim/sam_ops.py): the norm of a plain step checks its
  // gradients alone, and a mismatch with the parameters is refused by the step that follows.
  std::optional<at::Tensor> grad_sq_norm(std::vector<at::Tensor> grads, std::vector<int64_t> weighted, double eta) {
    if (!callable(grads)) return std::nullopt;
    RECORD_FUNCTION("cl_optim::grad_sq_norm (held lists)", std::vector<c10::IValue>());
    const auto reads = [&](int64_t kind) { return std::find(weighted.begin(), weighted.end(), kind) != weighted.end(); };
    return grad_sq_norm_cpu(grads, reads(kSamAsam) ? at::TensorList(lists[kParams]) : at::TensorList(),
                            reads(kSamFisherRunning) ? at::TensorList(lists[kFisher]) : at::TensorList(), weighted,
                            eta);
  }

  bool sam_perturb(std::vector<at::Tensor> grads, const at::Tensor& scale, std::vector<int64_t> weighted, double eta,
                   double fisher_beta, const OptionalTensor& grad_scale, const OptionalTensor& finite) {
    if (!callable(grads)) return false;
    RECORD_FUNCTION("cl_optim::sam_perturb_ (held lists)", std::vector<c10::IValue>());
    sam_perturb_cpu(lists[kParams], grads, lists[kSaves], scale, weighted, eta, lists[kFisher], fisher_beta,
                    grad_scale, finite);
    return true;
  }
};

}  // namespace
}  // namespace cl_optim

TORCH_LIBRARY_FRAGMENT(cl_optim, m) {
  // A second copy of this library in the process (a build loaded from another path) uses the
  // first one's class: registering the name again would throw during static initialisation.
  if (torch::getCustomClass("__torch__.torch.classes.cl_optim.HeldLists")) return;
  m.class_<cl_optim::HeldLists>("HeldLists")
      .def(torch::init<>())
      .def("hold", &cl_optim::HeldLists::hold)
      .def("hold_ewc", &cl_optim::HeldLists::hold_ewc)
      .def("hold_buffer_ready", &cl_optim::HeldLists::hold_buffer_ready)
      .def("adamw_step", &cl_optim::HeldLists::adamw_step)
      .def("sgd_step", &cl_optim::HeldLists::sgd_step)
      .def("grad_sq_norm", &cl_optim::HeldLists::grad_sq_norm)
      .def("sam_perturb", &cl_optim::HeldLists::sam_perturb);
}
