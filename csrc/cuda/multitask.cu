// The multi-task passes on CUDA (the math: cl_optim/multitask/fused.py). task_gram is a two-stage
// deterministic reduction: per block and task pair an fp64 partial, then a fixed-order sum per
// pair (no float atomics). task_combine_ is element-wise, reading the coefficients from device
// memory (no host synchronisation).
//
// T, the number of tasks, is a runtime value; the kernels are templates on how many tasks they hold,
// so that the products and sums stay in registers:
// * task_gram, T <= 8: one diagonal tile of all T tasks (T = 1..8 dispatched to a template), each
//   thread keeping T(T+1)/2 fp64 accumulators (36 at most). Every gradient element is read once:
//   the T|W|s bytes of the op's floor.
// * task_gram, T > 8: the tasks in groups of 8, a diagonal tile per group (the same kernels) and,
//   for every later task, off-diagonal tiles of 8 x 4 tasks (32 accumulators). Each tile is one pass
//   over its tasks' gradients, so an element is read once per tile it is in: twice for T = 9..12,
//   2.5 times on average for T = 16. Multi-task models rarely have more than 8 tasks; larger tiles
//   would spill their accumulators.
// * task_combine_, T <= 8: the addresses of out and the T task tensors in the kernel argument
//   (T = 1..8 dispatched, as TensorListMeta<T + 1>); T > 8: one kernel reading each tensor's T
//   task addresses from a device table the glue uploads (task_rows, launchers.h).
#include <cl_optim/elementwise.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "multi_tensor_apply.cuh"

namespace cl_optim::cuda {

constexpr int kGramThreads = 256;  // at most 255 registers per thread: room for 36 fp64 accumulators
constexpr int kGramWarps = kGramThreads / 32;
constexpr int kGroup = 8;      // tasks of a diagonal tile
constexpr int kHalfGroup = 4;  // the second side of an off-diagonal tile

// The largest kernel argument: an off-diagonal Gram tile's 12 lists.
static_assert(sizeof(TensorListMeta<kGroup + kHalfGroup>) <= 32764, "the Gram tile's meta exceeds CUDA's limit");
static_assert(sizeof(TensorListMeta<kCombineArgumentTasks + 1>) <= 32764, "the combine meta exceeds CUDA's limit");

// f(std::integral_constant<int, count>{}) for count in [N, kMax]: a runtime task count becomes a
// template parameter.
template <int N, int kMax, typename F>
void with_count(int count, const F& f) {
  if constexpr (N > kMax) {
    throw std::invalid_argument("cl_optim CUDA multi-task kernels: task count out of range");
  } else {
    if (count == N)
      f(std::integral_constant<int, N>{});
    else
      with_count<N + 1, kMax>(count, f);
  }
}

// Index of the task pair (i, j), i <= j, in the packed upper triangle of T x T (row by row).
__host__ __device__ __forceinline__ int64_t packed_pair(int64_t i, int64_t j, int64_t num_tasks) {
  return i * num_tasks - i * (i - 1) / 2 + (j - i);
}

// A tile of task pairs: tasks i0 + [0, TI) against j0 + [0, TJ). DIAG (j0 = i0, TJ = TI): the
// pairs a <= b only. Lists of the tile: the TI tasks, then (off-diagonal) the TJ tasks.
template <int TI, int TJ, bool DIAG>
struct Tile {
  static constexpr int kLists = DIAG ? TI : TI + TJ;
  static constexpr int kPairs = DIAG ? TI * (TI + 1) / 2 : TI * TJ;
  static_assert(!DIAG || TI == TJ, "a diagonal tile pairs a group with itself");
  static_assert(kPairs <= kGramThreads, "one thread writes each pair's partial");

  // The accumulator of the local pair (a, b), and back.
  static __host__ __device__ __forceinline__ constexpr int pair(int a, int b) {
    return DIAG ? a * TI - a * (a - 1) / 2 + (b - a) : a * TJ + b;
  }
  static __device__ __forceinline__ void unpair(int p, int& a, int& b) {
    if constexpr (DIAG) {
      a = 0;
      while (p >= TI - a) {
        p -= TI - a;
        ++a;
      }
      b = a + p;
    } else {
      a = p / TJ;
      b = p % TJ;
    }
  }
};

// Stage 1: partials[pair(i, j) * num_chunks + chunk] = sum over the chunk of g_i * g_j in fp64, for
// every pair of the tile. The product of two fp32 values is exact in fp64, so the fused multiply-add
// nvcc makes of `acc += x * y` rounds as a multiply then an add would (once, in the add); a large
// finite gradient (1e20) gives a finite entry.
template <typename scalar_t, int TI, int TJ, bool DIAG>
__global__ void __launch_bounds__(kGramThreads)
    task_gram_partials(TensorListMeta<Tile<TI, TJ, DIAG>::kLists> meta, int i0, int j0, int num_tasks,
                       double* partials, int64_t num_chunks, int64_t launch_offset) {
  using tile = Tile<TI, TJ, DIAG>;
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  const scalar_t* g[tile::kLists];
#pragma unroll
  for (int l = 0; l < tile::kLists; ++l) g[l] = static_cast<const scalar_t*>(meta.addresses[l][t]);
  double acc[tile::kPairs];
#pragma unroll
  for (int p = 0; p < tile::kPairs; ++p) acc[p] = 0.0;
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    double x[tile::kLists];
#pragma unroll
    for (int l = 0; l < tile::kLists; ++l) x[l] = static_cast<double>(load_as<float>(g[l][e]));
#pragma unroll
    for (int a = 0; a < TI; ++a) {
#pragma unroll
      for (int b = DIAG ? a : 0; b < TJ; ++b) acc[tile::pair(a, b)] += x[a] * x[DIAG ? b : TI + b];
    }
  }
  // Deterministic block sums: a fixed shuffle tree per warp, then the warps in order.
  __shared__ double warp_sums[tile::kPairs][kGramWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int p = 0; p < tile::kPairs; ++p) {
    double v = acc[p];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[p][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < tile::kPairs) {
    double sum = 0.0;
    for (int w = 0; w < kGramWarps; ++w) sum += warp_sums[threadIdx.x][w];
    int a, b;
    tile::unpair(threadIdx.x, a, b);
    const int64_t i = i0 + a, j = (DIAG ? i0 : j0) + b;
    partials[packed_pair(i, j, num_tasks) * num_chunks + launch_offset + blockIdx.x] = sum;
  }
}

// Stage 2, one block per entry of G (row major): the sum of pair (min, max)'s chunk partials in a
// fixed order. G_ij and G_ji add the same partials in the same order: equal bit for bit.
__global__ void __launch_bounds__(kThreads)
    task_gram_sum(const double* partials, int64_t num_chunks, int num_tasks, double* out) {
  const int i = blockIdx.x / num_tasks, j = blockIdx.x % num_tasks;
  const int64_t first = packed_pair(i < j ? i : j, i < j ? j : i, num_tasks) * num_chunks;
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < num_chunks; c += blockDim.x) sum += partials[first + c];
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// out <- (out or 0) + sum_t a_t g_t in fp32, tasks in order, each product and sum rounded as the
// oracle rounds them (__fmul_rn/__fadd_rn: nvcc would otherwise contract them into an FMA), one
// rounding to out's dtype. A thread reads all of an element's values before it writes it, so out
// may be one of the task lists. Lists: 0 out, 1 + t task t.
template <typename scalar_t, int T>
__global__ void __launch_bounds__(kThreads)
    task_combine_kernel(TensorListMeta<T + 1> meta, const float* coefficients, bool accumulate) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* out = static_cast<scalar_t*>(meta.addresses[0][t]);
  const scalar_t* g[T];
  float a[T];
#pragma unroll
  for (int l = 0; l < T; ++l) {
    g[l] = static_cast<const scalar_t*>(meta.addresses[1 + l][t]);
    a[l] = coefficients[l];
  }
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    float acc = accumulate ? load_as<float>(out[e]) : 0.f;  // uniform branch; 0 + a*g as the oracle
#pragma unroll
    for (int l = 0; l < T; ++l) acc = __fadd_rn(acc, __fmul_rn(a[l], load_as<float>(g[l][e])));
    out[e] = store_as<scalar_t>(acc);
  }
}

// The same for T > kCombineArgumentTasks: list 1 holds the address of each tensor's row of the
// device table of task addresses (read through the cache: every thread of a block reads the same).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    task_combine_rows_kernel(TensorListMeta<2> meta, const float* coefficients, int num_tasks, bool accumulate) {
  int t;
  int64_t begin, end;
  chunk_range(meta, t, begin, end);
  auto* out = static_cast<scalar_t*>(meta.addresses[0][t]);
  const auto* row = static_cast<const void* const*>(meta.addresses[1][t]);
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    float acc = accumulate ? load_as<float>(out[e]) : 0.f;
    for (int l = 0; l < num_tasks; ++l) {
      const auto* g = static_cast<const scalar_t*>(row[l]);
      acc = __fadd_rn(acc, __fmul_rn(coefficients[l], load_as<float>(g[e])));
    }
    out[e] = store_as<scalar_t>(acc);
  }
}

namespace {

// One pass of stage 1 over a tile's tasks (every chunk of every tensor).
template <typename scalar_t, int TI, int TJ, bool DIAG>
void gram_tile(const Lists& lists, const std::vector<int64_t>& sizes, int i0, int j0, double* partials,
               int64_t num_chunks, cudaStream_t stream) {
  constexpr int kLists = Tile<TI, TJ, DIAG>::kLists;
  Lists tile_lists;
  for (int a = 0; a < TI; ++a) tile_lists.push_back(lists[i0 + a]);
  if constexpr (!DIAG)
    for (int b = 0; b < TJ; ++b) tile_lists.push_back(lists[j0 + b]);
  const int num_tasks = static_cast<int>(lists.size());
  int64_t offset = 0;
  multi_tensor_apply<kLists>(tile_lists, sizes, {}, {}, [&](const TensorListMeta<kLists>& meta, int blocks) {
    task_gram_partials<scalar_t, TI, TJ, DIAG>
        <<<blocks, kGramThreads, 0, stream>>>(meta, i0, j0, num_tasks, partials, num_chunks, offset);
    check(cudaGetLastError(), "task_gram_partials launch");
    offset += blocks;
  });
}

}  // namespace

void task_gram_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, double* partials, double* out,
                    cudaStream_t stream) {
  const int num_tasks = static_cast<int>(lists.size());
  const int64_t num_chunks = chunk_count(sizes);
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    for (int g0 = 0; g0 < num_tasks; g0 += kGroup) {
      with_count<1, kGroup>(std::min(kGroup, num_tasks - g0), [&](auto size) {
        constexpr int kSize = decltype(size)::value;
        gram_tile<scalar_t, kSize, kSize, true>(lists, sizes, g0, g0, partials, num_chunks, stream);
      });
      // A group followed by later tasks is a full group of 8.
      for (int h0 = g0 + kGroup; h0 < num_tasks; h0 += kHalfGroup) {
        with_count<1, kHalfGroup>(std::min(kHalfGroup, num_tasks - h0), [&](auto size) {
          constexpr int kSize = decltype(size)::value;
          gram_tile<scalar_t, kGroup, kSize, false>(lists, sizes, g0, h0, partials, num_chunks, stream);
        });
      }
    }
  });
  task_gram_sum<<<static_cast<unsigned>(num_tasks) * static_cast<unsigned>(num_tasks), kThreads, 0, stream>>>(
      partials, num_chunks, num_tasks, out);
  check(cudaGetLastError(), "task_gram_sum launch");
}

void task_combine_cuda(int dtype, const Lists& lists, const std::vector<int64_t>& sizes, const float* coefficients,
                       bool accumulate, const void* const* task_rows, cudaStream_t stream) {
  const int num_tasks = static_cast<int>(lists.size()) - 1;
  by_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (num_tasks <= kCombineArgumentTasks) {
      with_count<1, kCombineArgumentTasks>(num_tasks, [&](auto count) {
        constexpr int kTasks = decltype(count)::value;
        multi_tensor_apply<kTasks + 1>(lists, sizes, {}, {}, [&](const TensorListMeta<kTasks + 1>& meta, int blocks) {
          task_combine_kernel<scalar_t, kTasks><<<blocks, kThreads, 0, stream>>>(meta, coefficients, accumulate);
          check(cudaGetLastError(), "task_combine_kernel launch");
        });
      });
      return;
    }
    if (task_rows == nullptr) throw std::invalid_argument("task_combine_cuda: more than 8 tasks need task_rows");
    Lists row_lists{lists[0], {}};
    for (size_t k = 0; k < sizes.size(); ++k)
      row_lists[1].push_back(const_cast<void*>(static_cast<const void*>(task_rows + k * num_tasks)));
    multi_tensor_apply<2>(row_lists, sizes, {}, {}, [&](const TensorListMeta<2>& meta, int blocks) {
      task_combine_rows_kernel<scalar_t>
          <<<blocks, kThreads, 0, stream>>>(meta, coefficients, num_tasks, accumulate);
      check(cudaGetLastError(), "task_combine_rows_kernel launch");
    });
  });
}

}  // namespace cl_optim::cuda
