// The CPU implementations of cl_optim's ops (csrc/cpu/*.cpp), declared once for the files that
// call them: bindings.cpp registers them with the dispatcher, held_lists.cpp calls them directly.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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
void lstm_forward_steps_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
void lstm_backward_steps_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);

}  // namespace cl_optim
