// The host launchers of the CUDA kernels (csrc/cuda/*.cu) and their scalar arguments: what the
// torch glue (csrc/bindings_cuda.cpp) calls. CUDA runtime types only, so both the .cu files
// (nvcc) and the glue (the host compiler, with torch's headers) include it.
//
// Tensors travel as `lists[l][t]`, the address of tensor t in list l (nullptr where a term is off
// for that list), with `sizes[t]` elements; `dtype` is the parameter dtype: 0 fp32, 1 fp16, 2 bf16.
// Device scalars are pointers (nullptr: the term is off): no launcher reads them on the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace cl_optim::cuda {

using Lists = std::vector<std::vector<void*>>;

// Elements per block-chunk of every multi-tensor launch; reductions leave one partial per chunk.
constexpr int kChunkElements = 16384;

// The lists of the step kernels: SGD 7, AdamW 10, each followed by the COMBINE sources.
constexpr int kSgdLists = 7 + 3;
constexpr int kAdamWLists = 10 + 3;

inline int64_t chunk_count(const std::vector<int64_t>& sizes) {
  int64_t chunks = 0;
  for (int64_t size : sizes) chunks += (size + kChunkElements - 1) / kChunkElements;
  return chunks;
}

// COMBINE sources the step kernels read themselves; with more, the glue forms the combination first.
constexpr int kMaxFusedSources = 3;

struct SgdDeviceArgs {
  const float* inv_scale;  // AMP: 1/grad_scale, or null
  const float* found_inf;  // AMP: skip the update (after RESTORE) when non-zero, or null
  const float* clip_coef;  // CLIP, or null
  const float* combine_coef;  // COMBINE: n_sources + 1 coefficients (fp32), or null
  int n_sources;              // COMBINE: sources in lists 7.. (-1: off)
  const float* descent_coef;  // DESCENT: n_sources + 1 coefficients d_j * lr / grad_scale (fp32), or null
  float lr, sign, fisher_beta;
  float momentum, one_minus_dampening, weight_decay;
  bool nesterov;
};

// Lists: 0 param, 1 grad, 2 momentum buffer, 3 save, 4 fisher, 5 EWC precision, 6 EWC anchor,
// 7-9 COMBINE sources. `ready` (momentum buffers started) is one value per call: the glue launches the tensors of a
// first step apart.
void sgd_step_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& ewc_lam,
                   const SgdDeviceArgs& args, bool save, bool fisher, bool ewc, bool momentum, bool ready,
                   cudaStream_t stream);

struct AdamWDeviceArgs {
  const float* inv_scale;  // AMP: 1/grad_scale, or null
  const float* found_inf;  // AMP: skip the update (after RESTORE) when non-zero, or null
  const float* clip_coef;  // CLIP, or null
  const float* combine_coef;  // COMBINE: n_sources + 1 coefficients (fp32), or null
  int n_sources;              // COMBINE: sources in lists 10.. (-1: off)
  const float* descent_coef;  // DESCENT: n_sources + 1 coefficients d_j * lr / grad_scale (fp32), or null
  float sign, fisher_beta;
  float decay, one_minus_beta1, beta2, one_minus_beta2, eps;
  double lr_exact, beta1_exact, beta2_exact;  // the bias corrections, formed in double
};

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 save, 6 fisher,
// 7 EWC precision, 8 EWC anchor, 9 step (fp32 scalar on the device, already counted), 10-12
// COMBINE sources.
void adamw_step_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                     const std::vector<float>& ewc_lam, const AdamWDeviceArgs& args, bool save, bool fisher, bool ewc,
                     bool amsgrad, cudaStream_t stream);

// Lists: 0 grad, 1 param (ASAM), 2 running Fisher. `kinds[t]`: SamWeight of tensor t.
// `partials`: chunk_count(sizes) doubles of scratch; the sum (fp64) lands in *out.
void grad_sq_norm_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                       const std::vector<float>& kinds, float eta, double* partials, double* out, cudaStream_t stream);

// Lists: 0 param, 1 grad, 2 save, 3 fisher.
void sam_perturb_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes,
                      const std::vector<float>& kinds, const float* scale, const float* inv_scale,
                      const bool* finite, float eta, float fisher_beta, bool fisher, cudaStream_t stream);

// Lists: 0 fisher (fp32), 1 grad.
// per_sample_sq_accumulate_: out (M, N) fp32 += sum_b (deltas[b]^T inputs[b])^2; element strides of
// deltas (B, R, M), inputs (B, R, N) and out (M, N).
struct PerSampleSqShape {
  int64_t batch, rows, m, n;
  int64_t d_stride[3];
  int64_t x_stride[3];
  int64_t out_stride[2];
};
void per_sample_sq_cuda(int dtype, float* out, const void* deltas, const void* inputs, const PerSampleSqShape& shape,
                        cudaStream_t stream);

void fisher_accumulate_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, float weight,
                            cudaStream_t stream);

// Lists: 0 grad (written), 1 param, 2 precision, 3 anchor.
void ewc_grad_add_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& lam,
                       cudaStream_t stream);

// Lists: 0 param, 1 precision, 2 anchor. `partials`: chunk_count(sizes) doubles; *out (double) the penalty.
void ewc_penalty_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const std::vector<float>& lam,
                      double* partials, double* out, cudaStream_t stream);

// Lists: 0 precision, 1 anchor, 2 fisher, 3 param. `partials`: chunk_count(sizes) doubles;
// `tensor_ends[t]` (on the device): one past the last partial of tensor t; out[t] (double) the
// constant increment of tensor t.
void ewc_consolidate_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, float decay, float weight,
                          bool weighted_anchor, double* partials, const int64_t* tensor_ends, double* out,
                          cudaStream_t stream);

// Multi-task ops (cl_optim/multitask/fused.py). task_gram: list t holds task t's tensors (T
// lists); `partials`: task_gram_partial_count(T, sizes) doubles of scratch; out: T*T doubles, row
// major, G_ji = G_ij bit for bit.
inline int64_t task_gram_partial_count(int64_t num_tasks, const std::vector<int64_t>& sizes) {
  return num_tasks * (num_tasks + 1) / 2 * chunk_count(sizes);
}
void task_gram_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, double* partials, double* out,
                    cudaStream_t stream);

// Up to this many tasks, task_combine_ passes the task addresses in the kernel argument; beyond,
// the glue uploads them as a device table `task_rows` (task_rows[k * T + t]: task t's tensor k).
constexpr int kCombineArgumentTasks = 8;

// task_combine_: lists 0 out, 1 + t task t. `coefficients`: T floats on the device; `task_rows`:
// nullptr for T <= kCombineArgumentTasks.
void task_combine_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const float* coefficients,
                       bool accumulate, const void* const* task_rows, cudaStream_t stream);

}  // namespace cl_optim::cuda
