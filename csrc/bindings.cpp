// Registers the CPU implementations of cl_optim's ops. The schemas are declared once, in Python
// (cl_optim/ops.py, with their fake implementations for torch.compile); this file only binds
// the kernels of csrc/cpu to them.
#include <torch/library.h>

#include "cpu/ops_cpu.h"

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
  m.impl("lstm_forward_steps_", &cl_optim::lstm_forward_steps_cpu);
  m.impl("lstm_backward_steps_", &cl_optim::lstm_backward_steps_cpu);
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
