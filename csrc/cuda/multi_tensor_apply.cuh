// Multi-tensor apply (the apex pattern, written here): the addresses of up to kMaxTensors
// tensors of each list and a block -> (tensor, chunk) map travel as one kernel argument, so a
// whole (op, dtype) group is one launch per kMaxBlocks chunks, however many tensors it has.
// Torch-light on purpose: CUDA runtime only, no ATen headers (they cost minutes of nvcc time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cl_optim/elementwise.h>

#include "launchers.h"

namespace cl_optim::cuda {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = kChunkElements;  // elements per block-chunk (launchers.h)
constexpr int kThreads = 512;

template <int kLists>
struct TensorListMeta {
  void* addresses[kLists][kMaxTensors];
  int64_t sizes[kMaxTensors];  // 64-bit: a tensor may exceed 2^31 elements
  float scalars[2][kMaxTensors];  // per-tensor scalars (e.g. the EWC lambda, a SAM weight kind)
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

// The whole meta is one kernel argument. Above 4 KB (the AdamW kernel's 13 lists make ~6 KB)
// that needs CUDA 12.1+ (large kernel parameters, up to 32764 bytes; driver r530+): refused at
// build time with an older toolkit instead of failing to launch.
static_assert(sizeof(TensorListMeta<kAdamWLists>) <= 32764, "the multi-tensor meta exceeds CUDA's kernel-parameter limit");
#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
static_assert(sizeof(TensorListMeta<kAdamWLists>) <= 4096,
              "the AdamW kernel's argument block exceeds 4 KB: build with CUDA 12.1 or newer (large kernel parameters)");
#endif

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Host side: walks the tensors, fills metas and launches `launch(meta, blocks)` whenever the
// tensor table or the block map is full. lists[l][t] is the address of tensor t in list l.
template <int kLists, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<void*>>& lists, const std::vector<int64_t>& sizes,
                        const std::vector<float>& scalar0, const std::vector<float>& scalar1, const Launch& launch) {
  TensorListMeta<kLists> meta{};
  int tensors = 0, blocks = 0;
  const int64_t n = static_cast<int64_t>(sizes.size());
  for (int64_t t = 0; t < n; ++t) {
    if (sizes[t] == 0) continue;
    for (int l = 0; l < kLists; ++l) meta.addresses[l][tensors] = lists[l][t];
    meta.sizes[tensors] = sizes[t];
    meta.scalars[0][tensors] = scalar0.empty() ? 0.f : scalar0[t];
    meta.scalars[1][tensors] = scalar1.empty() ? 0.f : scalar1[t];
    ++tensors;
    const int64_t chunks = (sizes[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == kMaxTensors && last_chunk)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor continues in the next launch, as entry 0
          for (int l = 0; l < kLists; ++l) meta.addresses[l][0] = meta.addresses[l][tensors - 1];
          meta.sizes[0] = meta.sizes[tensors - 1];
          meta.scalars[0][0] = meta.scalars[0][tensors - 1];
          meta.scalars[1][0] = meta.scalars[1][tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks);
}

// f(scalar tag) for the parameter dtype code the launchers take: 0 fp32, 1 fp16, 2 bf16.
template <typename F>
void by_dtype(int dtype, const F& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__half{}); break;
    case 2: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("cl_optim CUDA kernels take fp32, fp16 or bf16 parameters");
  }
}

// The element range of this block's chunk.
template <int kLists>
__device__ __forceinline__ void chunk_range(const TensorListMeta<kLists>& meta, int& tensor, int64_t& begin,
                                            int64_t& end) {
  tensor = meta.block_to_tensor[blockIdx.x];
  begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  end = begin + kChunk < meta.sizes[tensor] ? begin + kChunk : meta.sizes[tensor];
}

// COMBINE at element i of tensor t: 0 + c_0 g + c_1 x_1 + ... in fp32 (sources in lists first..,
// each product and sum rounded as the oracle rounds them: no FMA), rounded to the gradient's dtype
// as task_combine_ writes a combination into .grad. `n_sources` is the same for every thread.
template <typename scalar_t, int kLists>
__device__ __forceinline__ float combined_grad(const TensorListMeta<kLists>& meta, int first, int t, int64_t i,
                                               const scalar_t* g, const float* coef, int n_sources) {
  float acc = __fadd_rn(0.f, __fmul_rn(coef[0], load_as<float>(g[i])));
  for (int j = 0; j < n_sources; ++j) {
    const auto* x = static_cast<const scalar_t*>(meta.addresses[first + j][t]);
    acc = __fadd_rn(acc, __fmul_rn(coef[j + 1], load_as<float>(x[i])));
  }
  return load_as<float>(store_as<scalar_t>(acc));
}

// DESCENT at element i of tensor t, after the update: the parameter as stored (`p_stored`) +
// c_0 g + c_1 x_1 + ... in fp32 with the raw gradient and COMBINE's sources (lists first..), each
// product and sum rounded as task_combine_ accumulates them (no FMA).
template <typename scalar_t, int kLists>
__device__ __forceinline__ float descended(const TensorListMeta<kLists>& meta, int first, int t, int64_t i,
                                           const scalar_t* g, float p_stored, const float* coef, int n_sources) {
  float acc = __fadd_rn(p_stored, __fmul_rn(coef[0], load_as<float>(g[i])));
  for (int j = 0; j < n_sources; ++j) {
    const auto* x = static_cast<const scalar_t*>(meta.addresses[first + j][t]);
    acc = __fadd_rn(acc, __fmul_rn(coef[j + 1], load_as<float>(x[i])));
  }
  return acc;
}

// Device scalars (lr, loss scale, found_inf, SAM scale) are read by pointer: a step needs no
// host synchronisation and can be captured in a CUDA graph. Null means "off" (the default value).
__device__ __forceinline__ float load_or(const float* p, float fallback) { return p ? *p : fallback; }

// Deterministic block reduction: every thread's value added along a fixed tree (same order on
// every run, no atomics). The result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_sum(T value) {
  __shared__ T shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// Stage 2 of a two-stage reduction, launched with one block per output: out[b] = the sum, in a
// fixed order, of partials[begin, end) with end = ends[b] and begin = ends[b - 1] (0 for b = 0);
// ends = nullptr sums all `count` partials into out[0].
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials(const T* partials, int64_t count, const int64_t* ends, T* out) {
  const int64_t begin = ends == nullptr || blockIdx.x == 0 ? 0 : ends[blockIdx.x - 1];
  const int64_t end = ends == nullptr ? count : ends[blockIdx.x];
  T sum = T(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

}  // namespace cl_optim::cuda
