// cl_optim.HeldLists (torch.classes.cl_optim.HeldLists): the tensor lists of one bucket's op call,
// held on the C++ side from step to step.
//
// Why: handing a Python list of tensors to an op converts it element by element (unpack, IValue,
// reference counts), about 0.24 us per tensor and list on the AMD EPYC of bench/results. An
// AdamW step over 2000 tensors takes six such lists: 2.4 ms before a byte is updated, as much as
// the update of 2000 x 4096 fp32 elements itself. Held here, a list is converted once, when the
// Python side (cl_optim/_held.py) sees a list that is not element for element the one it holds,
// and a step hands over only its scalars. The gradients are read from the held parameters'
// .grad at each call, borrowed (no reference count), since a backward with set_to_none makes new
// ones every step.
//
// Each call goes to the same CPU function the dispatcher would run (csrc/cpu/ops_cpu.h), with
// the same input checks, so a held call and a list call give the same numbers and the same
// refusals.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <c10/util/MaybeOwned.h>
#include <cl_optim/elementwise.h>

#include "ops_cpu.h"

#include <algorithm>
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

// The .grad of each parameter, borrowed for the length of one call: no reference count taken
// or dropped (a count per tensor would cost as much as the lookup itself).
class BorrowedGrads {
 public:
  explicit BorrowedGrads(const std::vector<at::Tensor>& params) {
    grads_.reserve(params.size());
    for (const auto& p : params) grads_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(p.grad()));
  }
  ~BorrowedGrads() {
    for (auto& g : grads_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(g);
  }
  BorrowedGrads(const BorrowedGrads&) = delete;
  BorrowedGrads& operator=(const BorrowedGrads&) = delete;
  at::TensorList list() const { return grads_; }

 private:
  std::vector<at::Tensor> grads_;
};

struct HeldLists : torch::CustomClassHolder {
  std::vector<std::vector<at::Tensor>> lists = std::vector<std::vector<at::Tensor>>(kSlots);
  OptionalTensors ewc_precision, ewc_anchor;
  std::vector<double> ewc_lam;
  std::vector<int64_t> buffer_ready;

  static void check_cpu(const at::Tensor& t, int64_t slot) {
    TORCH_CHECK(!t.defined() || t.device().is_cpu(), "HeldLists: slot ", slot,
                " holds a tensor on ", t.device(), ": held calls run the CPU kernels only");
  }

  void hold(int64_t slot, std::vector<at::Tensor> tensors) {
    TORCH_CHECK(slot >= 0 && slot < kSlots, "HeldLists.hold: no slot ", slot);
    for (const auto& t : tensors) check_cpu(t, slot);
    lists[slot] = std::move(tensors);
  }

  void hold_ewc(OptionalTensors precision, OptionalTensors anchor, std::vector<double> lam) {
    for (const std::optional<at::Tensor> t : precision)
      if (t.has_value()) check_cpu(*t, -1);
    for (const std::optional<at::Tensor> t : anchor)
      if (t.has_value()) check_cpu(*t, -1);
    ewc_precision = std::move(precision);
    ewc_anchor = std::move(anchor);
    ewc_lam = std::move(lam);
  }

  void hold_buffer_ready(std::vector<int64_t> ready) { buffer_ready = std::move(ready); }

  int64_t size(int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < kSlots, "HeldLists.size: no slot ", slot);
    return static_cast<int64_t>(lists[slot].size());
  }

  void adamw_step(const OptionalTensor& combine_coef, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                  const OptionalTensor& clip_coef, double fisher_beta, bool maximize, double lr, double beta1,
                  double beta2, double eps, double weight_decay) {
    const BorrowedGrads grads(lists[kParams]);
    adamw_step_cpu(lists[kParams], grads.list(), lists[kExpAvgs], lists[kExpAvgSqs], lists[kMaxExpAvgSqs],
                   lists[kSteps], lists[kRestoreFrom], lists[kCombineFrom], combine_coef, lists[kFisher],
                   ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef, fisher_beta, maximize, lr,
                   beta1, beta2, eps, weight_decay);
  }

  void sgd_step(const OptionalTensor& combine_coef, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                const OptionalTensor& clip_coef, double fisher_beta, bool maximize, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov) {
    const BorrowedGrads grads(lists[kParams]);
    sgd_step_cpu(lists[kParams], grads.list(), lists[kMomentumBuffers], buffer_ready, lists[kRestoreFrom],
                 lists[kCombineFrom], combine_coef, lists[kFisher], ewc_precision, ewc_anchor, ewc_lam, grad_scale,
                 found_inf, clip_coef, fisher_beta, maximize, lr, momentum, dampening, weight_decay, nesterov);
  }

  // The parameters and the Fisher go down only where a weight kind reads them, as the Python
  // caller of the op hands them (cl_optim/sam_ops.py): the norm of a plain step checks its
  // gradients alone, and a mismatch with the parameters is refused by the step that follows.
  at::Tensor grad_sq_norm(std::vector<int64_t> weighted, double eta) {
    const BorrowedGrads grads(lists[kParams]);
    const auto reads = [&](int64_t kind) { return std::find(weighted.begin(), weighted.end(), kind) != weighted.end(); };
    return grad_sq_norm_cpu(grads.list(), reads(kSamAsam) ? at::TensorList(lists[kParams]) : at::TensorList(),
                            reads(kSamFisherRunning) ? at::TensorList(lists[kFisher]) : at::TensorList(), weighted,
                            eta);
  }

  void sam_perturb(const at::Tensor& scale, std::vector<int64_t> weighted, double eta, double fisher_beta,
                   const OptionalTensor& grad_scale, const OptionalTensor& finite) {
    const BorrowedGrads grads(lists[kParams]);
    sam_perturb_cpu(lists[kParams], grads.list(), lists[kSaves], scale, weighted, eta, lists[kFisher], fisher_beta,
                    grad_scale, finite);
  }
};

}  // namespace
}  // namespace cl_optim

TORCH_LIBRARY_FRAGMENT(cl_optim, m) {
  m.class_<cl_optim::HeldLists>("HeldLists")
      .def(torch::init<>())
      .def("hold", &cl_optim::HeldLists::hold)
      .def("hold_ewc", &cl_optim::HeldLists::hold_ewc)
      .def("hold_buffer_ready", &cl_optim::HeldLists::hold_buffer_ready)
      .def("size", &cl_optim::HeldLists::size)
      .def("adamw_step", &cl_optim::HeldLists::adamw_step)
      .def("sgd_step", &cl_optim::HeldLists::sgd_step)
      .def("grad_sq_norm", &cl_optim::HeldLists::grad_sq_norm)
      .def("sam_perturb", &cl_optim::HeldLists::sam_perturb);
}
