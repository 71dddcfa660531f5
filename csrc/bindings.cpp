// Registers the CPU implementations of cl_optim's ops. The schemas are declared once, in Python
// (cl_optim/ops.py, with their fake implementations for torch.compile); this file only binds
// the kernels of csrc/cpu to them.
#include <torch/library.h>

namespace cl_optim {

void sgd_step_cpu(at::TensorList, at::TensorList, at::TensorList, c10::IntArrayRef, at::TensorList, at::TensorList,
                  const c10::List<std::optional<at::Tensor>>&, const c10::List<std::optional<at::Tensor>>&,
                  c10::ArrayRef<double>, double, double, double, bool, double, double, double, double, bool);
void adamw_step_cpu(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    c10::ArrayRef<double>, c10::ArrayRef<double>, at::TensorList, at::TensorList,
                    const c10::List<std::optional<at::Tensor>>&, const c10::List<std::optional<at::Tensor>>&,
                    c10::ArrayRef<double>, double, double, double, bool, double, double, double, double, double);
at::Tensor grad_sq_norm_cpu(at::TensorList, at::TensorList, c10::IntArrayRef, double);
void sam_perturb_cpu(at::TensorList, at::TensorList, at::TensorList, double, c10::IntArrayRef, double, at::TensorList,
                     double, double, bool);

}  // namespace cl_optim

TORCH_LIBRARY_IMPL(cl_optim, CPU, m) {
  m.impl("sgd_step_", &cl_optim::sgd_step_cpu);
  m.impl("adamw_step_", &cl_optim::adamw_step_cpu);
  m.impl("grad_sq_norm", &cl_optim::grad_sq_norm_cpu);
  m.impl("sam_perturb_", &cl_optim::sam_perturb_cpu);
}
