// per_sample_sq_accumulate_ on CUDA: out (M, N) fp32 += sum_b (deltas[b]^T inputs[b])^2 for deltas
// (B, R, M) and inputs (B, R, N), any strides (the math and the oracle: cl_optim/fisher/squares.py;
// the same scheme as the Triton kernel, kernels/per_sample_sq.py).
//
// One block per 32 x 32 tile of out, 256 threads, each owning 2 x 2 elements. For each sample in
// order the block stages 16 rows of deltas[b] and inputs[b] at a time in shared memory (fp32,
// converted once there), forms the sample's product tile in registers and squares it into a
// second register tile; out is read and written once at the end. No per-sample product reaches
// memory. Every product and sum in fp32, each rounded (no FMA contraction), in a fixed order: each
// element adds its samples in order and the result does not depend on the launch. (The CPU op's
// BLAS and the Triton dot may fuse and reorder their sums: backends agree to fp32 rounding.)
#include <cl_optim/elementwise.h>

#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {
namespace {

constexpr int kTile = 32;     // rows and columns of out per block
constexpr int kRows = 16;     // rows of R staged per step
constexpr int kPerThread = 2; // out elements per thread along each side: (32 / 2)^2 = 256 threads

template <typename scalar_t>
__global__ void __launch_bounds__(256) per_sample_sq_kernel(float* out, const scalar_t* deltas, const scalar_t* inputs,
                                                            PerSampleSqShape shape) {
  __shared__ float d_tile[kRows][kTile];
  __shared__ float x_tile[kRows][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, thread = ty * blockDim.x + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float squares[kPerThread][kPerThread] = {{0.f, 0.f}, {0.f, 0.f}};
  for (int64_t b = 0; b < shape.batch; ++b) {
    const scalar_t* d = deltas + b * shape.d_stride[0];
    const scalar_t* x = inputs + b * shape.x_stride[0];
    float product[kPerThread][kPerThread] = {{0.f, 0.f}, {0.f, 0.f}};
    for (int64_t r0 = 0; r0 < shape.rows; r0 += kRows) {
      for (int e = thread; e < kRows * kTile; e += 256) {  // consecutive threads: consecutive m (n)
        const int r = e / kTile, c = e % kTile;
        const int64_t row = r0 + r, dm = m0 + c, xn = n0 + c;
        d_tile[r][c] = row < shape.rows && dm < shape.m
                           ? load_as<float>(d[row * shape.d_stride[1] + dm * shape.d_stride[2]])
                           : 0.f;
        x_tile[r][c] = row < shape.rows && xn < shape.n
                           ? load_as<float>(x[row * shape.x_stride[1] + xn * shape.x_stride[2]])
                           : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kPerThread; ++j)
            product[i][j] = __fadd_rn(product[i][j],
                                      __fmul_rn(d_tile[r][ty * kPerThread + i], x_tile[r][tx * kPerThread + j]));
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) squares[i][j] = __fadd_rn(squares[i][j], __fmul_rn(product[i][j], product[i][j]));
  }
  for (int i = 0; i < kPerThread; ++i) {
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t row = m0 + ty * kPerThread + i, col = n0 + tx * kPerThread + j;
      if (row < shape.m && col < shape.n) {
        float* target = out + row * shape.out_stride[0] + col * shape.out_stride[1];
        *target = __fadd_rn(*target, squares[i][j]);
      }
    }
  }
}

}  // namespace

void per_sample_sq_cuda(int dtype, float* out, const void* deltas, const void* inputs, const PerSampleSqShape& shape,
                        cudaStream_t stream) {
  if (shape.batch == 0 || shape.rows == 0 || shape.m == 0 || shape.n == 0) return;
  const dim3 grid(static_cast<unsigned>((shape.n + kTile - 1) / kTile), static_cast<unsigned>((shape.m + kTile - 1) / kTile));
  if (grid.y > 65535) throw std::invalid_argument("per_sample_sq_accumulate_: more than 2097120 rows of out");
  const dim3 block(kTile / kPerThread, kTile / kPerThread);
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    per_sample_sq_kernel<scalar_t><<<grid, block, 0, stream>>>(out, static_cast<const scalar_t*>(deltas),
                                                              static_cast<const scalar_t*>(inputs), shape);
    check(cudaGetLastError(), "per_sample_sq_kernel launch");
  });
}

}  // namespace cl_optim::cuda
