// Registers the CUDA implementations of cl_optim's ops (schemas: cl_optim/ops.py). The torch glue
// only: it checks the inputs, turns tensor lists into address tables, keeps every per-step scalar
// (loss scale, found_inf, clip coefficient, SAM scale, step counts) on the device, and calls the
// torch-free launchers of csrc/cuda (launchers.h). Nothing here reads a device value on the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"
#include "op_checks.h"

namespace cl_optim {
namespace {

using cuda::Lists;
using OptionalTensor = std::optional<at::Tensor>;
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "the cl_optim CUDA kernels take fp32, fp16 or bf16 tensors, got ", type);
  }
  return -1;
}

// The tensors of an op as the kernels walk them (see Workspace in cpu/multi_tensor.h): each
// entry i in the layout of its lead tensor when that is dense, else contiguous; a tensor in another
// layout is worked on in a copy of that layout, which finish() writes back when the op writes it.
// Every tensor is on `device` (checked by op_checks.h before).
class Workspace {
 public:
  Workspace(at::Device device, at::TensorList lead) : device_(device), lead_(lead) {}
  void* use(const at::Tensor& t, bool written, int64_t i) {
    if (!t.defined()) return nullptr;
    TORCH_CHECK(t.device() == device_, "cl_optim CUDA op: a tensor is on ", t.device(), ", expected ", device_);
    const at::Tensor& like = lead_[i];
    if (walks_as(t, like)) return t.data_ptr();
    at::Tensor copy = like.is_non_overlapping_and_dense() ? at::empty_like(like, t.options())
                                                          : at::empty(t.sizes(), t.options());
    copy.copy_(t);
    keep_.push_back(copy);
    if (written) writes_.emplace_back(t, copy);
    return copy.data_ptr();
  }
  void finish() {
    for (auto& [dst, src] : writes_) dst.copy_(src);
  }

 private:
  at::Device device_;
  at::TensorList lead_;
  std::vector<at::Tensor> keep_;
  std::vector<std::pair<at::Tensor, at::Tensor>> writes_;
};

// A device scalar as the kernels read it (fp32 on `device`), or an undefined tensor.
at::Tensor device_float(const OptionalTensor& t, at::Device device) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->numel() == 1, "cl_optim: a per-step scalar must have one element, got ", t->numel());
  return t->to(device, at::kFloat).reshape({});
}

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// 1/grad_scale rounded as GradScaler.unscale_ does (reciprocal in double, then fp32), on the device.
at::Tensor device_inv_scale(const OptionalTensor& grad_scale, at::Device device) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return {};
  return grad_scale->to(device, at::kDouble).reciprocal().to(at::kFloat).reshape({});
}

struct Launch {
  Lists lists;
  std::vector<int64_t> sizes;
  std::vector<float> scalars;
  explicit Launch(int n_lists) : lists(n_lists) {}
};

// The optional per-tensor terms of the SGD and AdamW steps, split by what switches a kernel flag.
struct StepInputs {
  bool save, fisher;
  std::vector<bool> ewc;
  std::vector<float> lam;

  // The inputs are checked (check_sgd_step / check_adamw_step) before this is built.
  StepInputs(int64_t n, at::TensorList restore_from, at::TensorList fisher_in, const OptionalTensors& precision,
             c10::ArrayRef<double> ewc_lam)
      : save(!restore_from.empty()), fisher(!fisher_in.empty()), ewc(n, false), lam(n, 0.f) {
    for (size_t i = 0; i < precision.size(); ++i) {
      const OptionalTensor a = precision.get(i);
      if (a.has_value() && a->defined()) {
        ewc[i] = true;
        lam[i] = static_cast<float>(ewc_lam[i]);
      }
    }
  }
};

void task_combine_cuda_op(at::TensorList out, at::TensorList grads, const at::Tensor& coefficients, bool accumulate);

// COMBINE as the step kernels take it: up to kMaxFusedSources sources read in the kernel (their
// coefficients as fp32 on the device, `n_sources` -1 when off); with more, the combination is
// formed first by task_combine_ (one more pass) into `storage`, `grads` points there and the
// term is off.
struct CombineInputs {
  at::Tensor coef;
  int n_sources = -1;
  at::TensorList sources;
  std::vector<at::Tensor> storage;

  CombineInputs(int64_t k, at::TensorList& grads, at::TensorList combine_from, const OptionalTensor& combine_coef,
                at::Device device) {
    if (!combine_coef.has_value() || !combine_coef->defined()) return;
    // A 2-D combine_coef: row 0 COMBINE's, row 1 DESCENT's (at most kMaxFusedSources sources, checked).
    const at::Tensor row = combine_coef->dim() == 2 ? combine_coef->select(0, 0) : *combine_coef;
    if (k <= cuda::kMaxFusedSources) {
      coef = row.to(device, at::kFloat).contiguous();
      n_sources = static_cast<int>(k);
      sources = combine_from;
      return;
    }
    for (const at::Tensor& g : grads) storage.push_back(at::empty_like(g));
    std::vector<at::Tensor> tasks(grads.begin(), grads.end());
    tasks.insert(tasks.end(), combine_from.begin(), combine_from.end());
    task_combine_cuda_op(storage, tasks, row, false);
    grads = storage;
  }
  // DESCENT's coefficients d_j * lr * (1/grad_scale), formed in double by device ops (as the Python
  // backends form them) then fp32; undefined when the term is off.
  static at::Tensor descent(const OptionalTensor& combine_coef, double lr, const at::Tensor& inv_scale,
                            at::Device device) {
    if (!combine_coef.has_value() || !combine_coef->defined() || combine_coef->dim() != 2) return at::Tensor();
    at::Tensor out = combine_coef->select(0, 1).to(device, at::kDouble) * lr;
    if (inv_scale.defined()) out = out * inv_scale.to(at::kDouble);
    return out.to(at::kFloat).contiguous();
  }
  // Source j of tensor i (n tensors), or null.
  const at::Tensor* source(int j, int64_t i, int64_t n) const {
    return j < n_sources ? &sources[j * n + i] : nullptr;
  }
};

void sgd_step_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      c10::IntArrayRef buffer_ready, at::TensorList restore_from, at::TensorList combine_from,
                      const OptionalTensor& combine_coef, at::TensorList fisher,
                      const OptionalTensors& ewc_precision, const OptionalTensors& ewc_anchor,
                      c10::ArrayRef<double> ewc_lam, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                      const OptionalTensor& clip_coef, double fisher_beta, bool maximize, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov) {
  const OpInputs in = check_sgd_step(c10::DeviceType::CUDA, params, grads, momentum_buffers, buffer_ready, restore_from,
                                     combine_from, combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam,
                                     grad_scale, found_inf, clip_coef);
  const int64_t n = in.size();
  if (n == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t k = combine_coef.has_value() && combine_coef->defined() ? combine_coef->size(-1) - 1 : 0;
  const CombineInputs combine(k, grads, combine_from, combine_coef, device);
  const bool has_momentum = !momentum_buffers.empty();
  const StepInputs terms(n, restore_from, fisher, ewc_precision, ewc_lam);
  const at::Tensor inv_scale = device_inv_scale(grad_scale, device);
  const at::Tensor skip = device_float(found_inf, device), clip = device_float(clip_coef, device);
  const at::Tensor descent = CombineInputs::descent(combine_coef, lr, inv_scale, device);
  cuda::SgdDeviceArgs args{float_ptr(inv_scale),
                           float_ptr(skip),
                           float_ptr(clip),
                           combine.coef.defined() ? combine.coef.data_ptr<float>() : nullptr,
                           combine.n_sources,
                           float_ptr(descent),
                           static_cast<float>(lr),
                           maximize ? -1.f : 1.f,
                           static_cast<float>(fisher_beta),
                           static_cast<float>(momentum),
                           static_cast<float>(1.0 - dampening),
                           static_cast<float>(weight_decay),
                           nesterov};
  Workspace ws(device, params);
  // One launch group per (buffer started, EWC covered): both are kernel flags.
  std::map<std::pair<bool, bool>, Launch> launches;
  for (int64_t i = 0; i < n; ++i) {
    const bool ready = has_momentum && buffer_ready[i] != 0;
    auto& launch = launches.try_emplace({ready, terms.ewc[i]}, cuda::kSgdLists).first->second;
    const OptionalTensor a = terms.ewc[i] ? ewc_precision.get(i) : OptionalTensor(),
                         mu = terms.ewc[i] ? ewc_anchor.get(i) : OptionalTensor();
    void* addresses[cuda::kSgdLists] = {ws.use(params[i], true, i),
                                        ws.use(grads[i], false, i),
                                        has_momentum ? ws.use(momentum_buffers[i], true, i) : nullptr,
                                        terms.save ? ws.use(restore_from[i], false, i) : nullptr,
                                        terms.fisher ? ws.use(fisher[i], true, i) : nullptr,
                                        a.has_value() ? ws.use(*a, false, i) : nullptr,
                                        mu.has_value() ? ws.use(*mu, false, i) : nullptr};
    for (int j = 0; j < cuda::kMaxFusedSources; ++j) {
      const at::Tensor* x = combine.source(j, i, n);
      addresses[7 + j] = x ? ws.use(*x, false, i) : nullptr;
    }
    for (int l = 0; l < cuda::kSgdLists; ++l) launch.lists[l].push_back(addresses[l]);
    launch.sizes.push_back(params[i].numel());
    launch.scalars.push_back(terms.lam[i]);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [key, launch] : launches)
    cuda::sgd_step_cuda(dtype_code(params[0].scalar_type()), launch.lists, launch.sizes, launch.scalars, args,
                        terms.save, terms.fisher, key.second, has_momentum, key.first, stream);
  ws.finish();
}

void adamw_step_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                        at::TensorList restore_from, at::TensorList combine_from, const OptionalTensor& combine_coef,
                        at::TensorList fisher, const OptionalTensors& ewc_precision,
                        const OptionalTensors& ewc_anchor, c10::ArrayRef<double> ewc_lam,
                        const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                        const OptionalTensor& clip_coef, double fisher_beta, bool maximize, double lr, double beta1,
                        double beta2, double eps, double weight_decay) {
  const OpInputs in = check_adamw_step(c10::DeviceType::CUDA, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                       steps, restore_from, combine_from, combine_coef, fisher, ewc_precision,
                                       ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef);
  const int64_t n = in.size();
  if (n == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t k = combine_coef.has_value() && combine_coef->defined() ? combine_coef->size(-1) - 1 : 0;
  const CombineInputs combine(k, grads, combine_from, combine_coef, device);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const StepInputs terms(n, restore_from, fisher, ewc_precision, ewc_lam);
  const at::Tensor inv_scale = device_inv_scale(grad_scale, device);
  const at::Tensor skip = device_float(found_inf, device), clip = device_float(clip_coef, device);
  const at::Tensor descent = CombineInputs::descent(combine_coef, lr, inv_scale, device);
  // Count the step on the device; a skipped step (found_inf non-zero, or NaN) is not counted, as
  // in torch. Counted as found_inf == 0, not 1 - found_inf: GradScaler hands over the sum of
  // per-device flags, which may be 2.
  if (skip.defined())
    at::_foreach_add_(steps, skip.eq(0).to(at::kFloat));
  else
    at::_foreach_add_(steps, 1.0);
  cuda::AdamWDeviceArgs args{float_ptr(inv_scale),
                             float_ptr(skip),
                             float_ptr(clip),
                             combine.coef.defined() ? combine.coef.data_ptr<float>() : nullptr,
                             combine.n_sources,
                             float_ptr(descent),
                             maximize ? -1.f : 1.f,
                             static_cast<float>(fisher_beta),
                             static_cast<float>(1.0 - lr * weight_decay),
                             static_cast<float>(1.0 - beta1),
                             static_cast<float>(beta2),
                             static_cast<float>(1.0 - beta2),
                             static_cast<float>(eps),
                             lr,
                             beta1,
                             beta2};
  Workspace ws(device, params);
  std::map<bool, Launch> launches;  // by EWC coverage, a kernel flag
  for (int64_t i = 0; i < n; ++i) {
    auto& launch = launches.try_emplace(terms.ewc[i], cuda::kAdamWLists).first->second;
    const OptionalTensor a = terms.ewc[i] ? ewc_precision.get(i) : OptionalTensor(),
                         mu = terms.ewc[i] ? ewc_anchor.get(i) : OptionalTensor();
    void* addresses[cuda::kAdamWLists] = {ws.use(params[i], true, i),
                                          ws.use(grads[i], false, i),
                                          ws.use(exp_avgs[i], true, i),
                                          ws.use(exp_avg_sqs[i], true, i),
                                          amsgrad ? ws.use(max_exp_avg_sqs[i], true, i) : nullptr,
                                          terms.save ? ws.use(restore_from[i], false, i) : nullptr,
                                          terms.fisher ? ws.use(fisher[i], true, i) : nullptr,
                                          a.has_value() ? ws.use(*a, false, i) : nullptr,
                                          mu.has_value() ? ws.use(*mu, false, i) : nullptr,
                                          steps[i].data_ptr()};
    for (int j = 0; j < cuda::kMaxFusedSources; ++j) {
      const at::Tensor* x = combine.source(j, i, n);
      addresses[10 + j] = x ? ws.use(*x, false, i) : nullptr;
    }
    for (int l = 0; l < cuda::kAdamWLists; ++l) launch.lists[l].push_back(addresses[l]);
    launch.sizes.push_back(params[i].numel());
    launch.scalars.push_back(terms.lam[i]);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [ewc, launch] : launches)
    cuda::adamw_step_cuda(dtype_code(params[0].scalar_type()), launch.lists, launch.sizes, launch.scalars, args,
                          terms.save, terms.fisher, ewc, amsgrad, stream);
  ws.finish();
}

// The weight kind of each tensor (elementwise.h SamWeight), as floats for the kernels (checked by the caller).
std::vector<float> sam_kinds(c10::IntArrayRef weighted, int64_t n) {
  std::vector<float> kinds(n, 0.f);
  for (size_t i = 0; i < weighted.size(); ++i) kinds[i] = static_cast<float>(weighted[i]);
  return kinds;
}

at::Tensor grad_sq_norm_cuda_op(at::TensorList grads, at::TensorList params, at::TensorList fisher,
                                c10::IntArrayRef weighted, double eta) {
  const OpInputs in = check_grad_sq_norm(c10::DeviceType::CUDA, grads, params, fisher, weighted);
  const int64_t n = in.size();
  if (n == 0) return at::zeros({}, at::TensorOptions().dtype(at::kDouble));  // as the CPU op
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto kinds = sam_kinds(weighted, n);
  Workspace ws(device, grads);
  Launch launch(3);
  for (int64_t i = 0; i < n; ++i) {
    launch.lists[0].push_back(ws.use(grads[i], false, i));
    launch.lists[1].push_back(kinds[i] == 1.f ? ws.use(params[i], false, i) : nullptr);
    launch.lists[2].push_back(kinds[i] == 3.f ? ws.use(fisher[i], false, i) : nullptr);
    launch.sizes.push_back(grads[i].numel());
  }
  const auto options = grads[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(cuda::chunk_count(launch.sizes), 1)}, options);
  at::Tensor out = at::empty({}, options);
  cuda::grad_sq_norm_cuda(dtype_code(grads[0].scalar_type()), launch.lists, launch.sizes, kinds,
                          static_cast<float>(eta), partials.data_ptr<double>(), out.data_ptr<double>(),
                          c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return out;
}

void sam_perturb_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList saves, const at::Tensor& scale,
                         c10::IntArrayRef weighted, double eta, at::TensorList fisher, double fisher_beta,
                         const OptionalTensor& grad_scale, const OptionalTensor& finite) {
  const OpInputs in =
      check_sam_perturb(c10::DeviceType::CUDA, params, grads, saves, scale, weighted, fisher, grad_scale, finite);
  const int64_t n = in.size();
  if (n == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto kinds = sam_kinds(weighted, n);
  const at::Tensor scale_f = device_float(scale, device), inv_scale = device_inv_scale(grad_scale, device);
  const at::Tensor finite_b = finite.has_value() && finite->defined() ? finite->to(device, at::kBool).reshape({})
                                                                      : at::Tensor();
  Workspace ws(device, params);
  Launch launch(4);
  for (int64_t i = 0; i < n; ++i) {
    launch.lists[0].push_back(ws.use(params[i], true, i));
    launch.lists[1].push_back(ws.use(grads[i], false, i));
    launch.lists[2].push_back(ws.use(saves[i], true, i));
    launch.lists[3].push_back(fisher.empty() ? nullptr : ws.use(fisher[i], true, i));
    launch.sizes.push_back(params[i].numel());
  }
  cuda::sam_perturb_cuda(dtype_code(params[0].scalar_type()), launch.lists, launch.sizes, kinds,
                         scale_f.data_ptr<float>(), float_ptr(inv_scale),
                         finite_b.defined() ? finite_b.data_ptr<bool>() : nullptr, static_cast<float>(eta),
                         static_cast<float>(fisher_beta), !fisher.empty(),
                         c10::cuda::getCurrentCUDAStream(device.index()).stream());
  ws.finish();
}

void fisher_accumulate_cuda_op(at::TensorList fisher, at::TensorList grads, double weight) {
  const OpInputs in = check_fisher_accumulate(c10::DeviceType::CUDA, fisher, grads);
  const int64_t n = in.size();
  if (n == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  Workspace ws(device, grads);
  Launch launch(2);
  for (int64_t i = 0; i < n; ++i) {
    launch.lists[0].push_back(ws.use(fisher[i], true, i));
    launch.lists[1].push_back(ws.use(grads[i], false, i));
    launch.sizes.push_back(fisher[i].numel());
  }
  cuda::fisher_accumulate_cuda(dtype_code(grads[0].scalar_type()), launch.lists, launch.sizes,
                               static_cast<float>(weight), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  ws.finish();
}

void per_sample_sq_accumulate_cuda_op(const at::Tensor& out, const at::Tensor& deltas, const at::Tensor& inputs) {
  check_per_sample_sq(c10::DeviceType::CUDA, out, deltas, inputs);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::PerSampleSqShape shape{deltas.size(0), deltas.size(1), deltas.size(2), inputs.size(2),
                               {deltas.stride(0), deltas.stride(1), deltas.stride(2)},
                               {inputs.stride(0), inputs.stride(1), inputs.stride(2)},
                               {out.stride(0), out.stride(1)}};
  cuda::per_sample_sq_cuda(dtype_code(deltas.scalar_type()), out.data_ptr<float>(), deltas.const_data_ptr(),
                           inputs.const_data_ptr(), shape,
                           c10::cuda::getCurrentCUDAStream(out.device().index()).stream());
}

// Lists of the EWC ops (checked by the caller): the parameter-dtype tensor first, then precision
// and anchor (fp32).
Launch ewc_launch(Workspace& ws, int n_lists, at::TensorList first, bool first_written, at::TensorList params,
                  at::TensorList precision, at::TensorList anchor, c10::ArrayRef<double> lam) {
  const int64_t n = static_cast<int64_t>(first.size());
  Launch launch(n_lists);
  for (int64_t i = 0; i < n; ++i) {
    int l = 0;
    launch.lists[l++].push_back(ws.use(first[i], first_written, i));
    if (n_lists == 4) launch.lists[l++].push_back(ws.use(params[i], false, i));
    launch.lists[l++].push_back(ws.use(precision[i], false, i));
    launch.lists[l++].push_back(ws.use(anchor[i], false, i));
    launch.sizes.push_back(first[i].numel());
    launch.scalars.push_back(static_cast<float>(lam[i]));
  }
  return launch;
}

void ewc_grad_add_cuda_op(at::TensorList grads, at::TensorList params, at::TensorList precision,
                          at::TensorList anchor, c10::ArrayRef<double> lam) {
  const OpInputs in = check_ewc_grad_add(c10::DeviceType::CUDA, grads, params, precision, anchor, lam);
  if (in.size() == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  Workspace ws(device, params);
  const Launch launch = ewc_launch(ws, 4, grads, true, params, precision, anchor, lam);
  cuda::ewc_grad_add_cuda(dtype_code(grads[0].scalar_type()), launch.lists, launch.sizes, launch.scalars,
                          c10::cuda::getCurrentCUDAStream(device.index()).stream());
  ws.finish();
}

at::Tensor ewc_penalty_cuda_op(at::TensorList params, at::TensorList precision, at::TensorList anchor,
                               c10::ArrayRef<double> lam) {
  const OpInputs in = check_ewc_penalty(c10::DeviceType::CUDA, params, precision, anchor, lam);
  if (in.size() == 0) return at::zeros({}, at::TensorOptions().dtype(at::kDouble));  // as the CPU op
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  Workspace ws(device, params);
  const Launch launch = ewc_launch(ws, 3, params, false, params, precision, anchor, lam);
  const auto options = params[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(cuda::chunk_count(launch.sizes), 1)}, options);
  at::Tensor out = at::empty({}, options);
  cuda::ewc_penalty_cuda(dtype_code(params[0].scalar_type()), launch.lists, launch.sizes, launch.scalars,
                         partials.data_ptr<double>(), out.data_ptr<double>(),
                         c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return out;
}

at::Tensor ewc_consolidate_cuda_op(at::TensorList precision, at::TensorList anchor, at::TensorList fisher,
                                   at::TensorList params, double decay, double weight, bool weighted_anchor) {
  const OpInputs in = check_ewc_consolidate(c10::DeviceType::CUDA, precision, anchor, fisher, params);
  const int64_t n = in.size();
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kDouble));  // as the CPU op
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  Workspace ws(device, params);
  Launch launch(4);
  std::vector<int64_t> tensor_ends;
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    launch.lists[0].push_back(ws.use(precision[i], true, i));
    launch.lists[1].push_back(ws.use(anchor[i], true, i));
    launch.lists[2].push_back(ws.use(fisher[i], false, i));
    launch.lists[3].push_back(ws.use(params[i], false, i));
    launch.sizes.push_back(precision[i].numel());
    chunks += cuda::chunk_count({precision[i].numel()});
    tensor_ends.push_back(chunks);
  }
  const auto options = precision[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(chunks, 1)}, options);
  at::Tensor ends = at::tensor(tensor_ends, at::TensorOptions().dtype(at::kLong)).to(device);
  at::Tensor out = at::empty({n}, options);
  cuda::ewc_consolidate_cuda(dtype_code(params[0].scalar_type()), launch.lists, launch.sizes,
                             static_cast<float>(decay), static_cast<float>(weight), weighted_anchor,
                             partials.data_ptr<double>(), ends.data_ptr<int64_t>(), out.data_ptr<double>(),
                             c10::cuda::getCurrentCUDAStream(device.index()).stream());
  ws.finish();
  return out;
}

// G (T x T, fp64, on the device) of the T task lists of `grads` (task-major): chunk partials per
// task pair, then a fixed-order sum per entry (csrc/cuda/multitask.cu).
at::Tensor task_gram_cuda_op(at::TensorList grads, int64_t num_tasks) {
  const OpInputs in = check_task_gram(c10::DeviceType::CUDA, grads, num_tasks);
  const int64_t n = in.size();
  if (n == 0) return at::zeros({num_tasks, num_tasks}, at::TensorOptions().dtype(at::kDouble));  // as the CPU op
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  Workspace ws(device, grads.slice(0, n));  // every task's tensor k walked as task 0's tensor k
  Lists lists(num_tasks);
  std::vector<int64_t> sizes;
  for (int64_t k = 0; k < n; ++k) sizes.push_back(grads[k].numel());
  for (int64_t t = 0; t < num_tasks; ++t)
    for (int64_t k = 0; k < n; ++k) lists[t].push_back(ws.use(grads[t * n + k], false, k));
  const auto options = grads[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(cuda::task_gram_partial_count(num_tasks, sizes), 1)}, options);
  at::Tensor out = at::empty({num_tasks, num_tasks}, options);
  cuda::task_gram_cuda(dtype_code(grads[0].scalar_type()), lists, sizes, partials.data_ptr<double>(),
                       out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return out;
}

// out <- (out or 0) + sum_t a_t g_t; the coefficients become fp32 on the device (no host read).
// Beyond kCombineArgumentTasks tasks, each tensor's task addresses travel as a device table,
// copied from pinned memory without blocking the host.
void task_combine_cuda_op(at::TensorList out, at::TensorList grads, const at::Tensor& coefficients, bool accumulate) {
  const OpInputs in = check_task_combine(c10::DeviceType::CUDA, out, grads, coefficients);
  const int64_t n = in.size();
  if (n == 0) return;
  const at::Device device = in.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_tasks = coefficients.numel();
  const at::Tensor a = coefficients.to(device, at::kFloat).contiguous();
  Workspace ws(device, out);
  Lists lists(num_tasks + 1);
  std::vector<int64_t> sizes;
  for (int64_t k = 0; k < n; ++k) {
    lists[0].push_back(ws.use(out[k], true, k));
    sizes.push_back(out[k].numel());
  }
  // After out's: a task tensor that is out[k] itself is read in place (each element before it is
  // written) or, in another layout, copied before anything is written.
  for (int64_t t = 0; t < num_tasks; ++t)
    for (int64_t k = 0; k < n; ++k) lists[1 + t].push_back(ws.use(grads[t * n + k], false, k));
  at::Tensor rows;
  if (num_tasks > cuda::kCombineArgumentTasks) {
    at::Tensor host = at::empty({n * num_tasks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* table = host.data_ptr<int64_t>();
    for (int64_t k = 0; k < n; ++k)
      for (int64_t t = 0; t < num_tasks; ++t) table[k * num_tasks + t] = reinterpret_cast<int64_t>(lists[1 + t][k]);
    rows = host.to(device, at::kLong, /*non_blocking=*/true);  // the pinned block is kept until the copy has run
  }
  cuda::task_combine_cuda(dtype_code(out[0].scalar_type()), lists, sizes, a.data_ptr<float>(), accumulate,
                          rows.defined() ? static_cast<const void* const*>(rows.data_ptr()) : nullptr,
                          c10::cuda::getCurrentCUDAStream(device.index()).stream());
  ws.finish();
}

}  // namespace
}  // namespace cl_optim

TORCH_LIBRARY_IMPL(cl_optim, CUDA, m) {
  m.impl("sgd_step_", &cl_optim::sgd_step_cuda_op);
  m.impl("adamw_step_", &cl_optim::adamw_step_cuda_op);
  m.impl("grad_sq_norm", &cl_optim::grad_sq_norm_cuda_op);
  m.impl("sam_perturb_", &cl_optim::sam_perturb_cuda_op);
  m.impl("fisher_accumulate_", &cl_optim::fisher_accumulate_cuda_op);
  m.impl("ewc_grad_add_", &cl_optim::ewc_grad_add_cuda_op);
  m.impl("ewc_penalty", &cl_optim::ewc_penalty_cuda_op);
  m.impl("ewc_consolidate_", &cl_optim::ewc_consolidate_cuda_op);
  m.impl("task_gram", &cl_optim::task_gram_cuda_op);
  m.impl("task_combine_", &cl_optim::task_combine_cuda_op);
  m.impl("per_sample_sq_accumulate_", &cl_optim::per_sample_sq_accumulate_cuda_op);
}

#ifdef CL_OPTIM_AOT
// Built ahead of time as the Python extension module cl_optim._C_cuda (see bindings.cpp).
#include <Python.h>
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
