// Registers the CPU implementations of cl_optim's ops. The schemas are declared once, in Python
// (cl_optim/ops.py, with their fake implementations for torch.compile); this file only binds
// the kernels of csrc/cpu to them.
#include <torch/library.h>

namespace cl_optim {

using OptionalTensor = std::optional<at::Tensor>;
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

void sgd_step_cpu(at::TensorList, at::TensorList, at::TensorList, c10::IntArrayRef, at::TensorList, at::TensorList,
                  const OptionalTensor&, at::TensorList, const OptionalTensors&, const OptionalTensors&, c10::ArrayRef<double>, const OptionalTensor&,
                  const OptionalTensor&, const OptionalTensor&, double, bool, double, double, double, double, bool);
void adamw_step_cpu(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, at::TensorList, const OptionalTensor&, at::TensorList, const OptionalTensors&, const OptionalTensors&,
                    c10::ArrayRef<double>, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double,
                    bool, double, double, double, double, double);
at::Tensor grad_sq_norm_cpu(at::TensorList, at::TensorList, at::TensorList, c10::IntArrayRef, double);
void sam_perturb_cpu(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, c10::IntArrayRef, double,
                     at::TensorList, double, const OptionalTensor&, const OptionalTensor&);

void fisher_accumulate_cpu(at::TensorList, at::TensorList, double);
void ewc_grad_add_cpu(at::TensorList, at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<double>);
at::Tensor ewc_penalty_cpu(at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<double>);
at::Tensor ewc_consolidate_cpu(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double, bool);

at::Tensor task_gram_cpu(at::TensorList, int64_t);
void task_combine_cpu(at::TensorList, at::TensorList, const at::Tensor&, bool);
void per_sample_sq_accumulate_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&);

}  // namespace cl_optim

TORCH_LIBRARY_IMPL(cl_optim, CPU, m) {
  m.impl("sgd_step_", &cl_optim::sgd_step_cpu);
  m.impl("adamw_step_", &cl_optim::adamw_step_cpu);
  m.impl("grad_sq_norm", &cl_optim::grad_sq_norm_cpu);
  m.impl("sam_perturb_", &cl_optim::sam_perturb_cpu);
  m.impl("fisher_accumulate_", &cl_optim::fisher_accumulate_cpu);
  m.impl("ewc_grad_add_", &cl_optim::ewc_grad_add_cpu);
  m.impl("ewc_penalty", &cl_optim::ewc_penalty_cpu);
  m.impl("ewc_consolidate_", &cl_optim::ewc_consolidate_cpu);
  m.impl("task_gram", &cl_optim::task_gram_cpu);
  m.impl("task_combine_", &cl_optim::task_combine_cpu);
  m.impl("per_sample_sq_accumulate_", &cl_optim::per_sample_sq_accumulate_cpu);
}

#ifdef CL_OPTIM_AOT
// Built ahead of time as the Python extension module cl_optim._C_cpu: importing (or
// torch.ops.load_library-ing) it runs the registrations above; the module itself is empty.
#include <Python.h>
extern "C" PyObject* PyInit__C_cpu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
