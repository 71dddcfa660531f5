// cl_optim::task_gram and cl_optim::task_combine_ on the CPU: the two passes over the task
// gradients of a multi-task step (the math: cl_optim/multitask/fused.py). `grads` holds T lists
// of n tensors one after the other (task-major); entry t*n + k is task t's tensor k.
#include <algorithm>
#include <type_traits>

#include "combine.h"

namespace cl_optim {
namespace {

// ------------------------------------------------------------------------------------ gram

// Elements per sub-block of a chunk: the T slices of one sub-block, as the dot products read
// them, fill at most 32 KiB, so they stay in L1 while every pair of them is multiplied (each
// slice takes part in T products). 1024 for fp32 up to T = 8.
int64_t gram_sub_block(int64_t num_tasks, int64_t element_size) {
  const int64_t fit = 32768 / (num_tasks * element_size);
  return std::clamp<int64_t>(fit / 8 * 8, 64, 1024);
}

// sum_e double(a[e]) * double(b[e]) with eight fp64 accumulators added in a fixed order at the
// end (as norm_chunk in sam.cpp): the adds overlap, and the sum does not depend on threads. The
// product of two fp32 (or narrower) values is exact in fp64, so a large finite gradient (1e20)
// gives a finite entry. a == b (a diagonal entry) is fine: both are only read.
template <typename T>
CLO_CPU_CLONES double dot(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(a[e + l]) * static_cast<double>(b[e + l]);
  for (; e < len; ++e) lanes[0] += static_cast<double>(a[e]) * static_cast<double>(b[e]);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// fp16/bf16 -> fp32 (exact), once per sub-block rather than once per product.
template <typename S>
CLO_CPU_CLONES void widen(float* __restrict__ dst, const S* __restrict__ src, int64_t len) {
  for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<float>(src[e]);
}

// One chunk (elements [begin, end) of one tensor k, in each task's slice): the products of every
// task pair i <= j, added into `out`, the packed upper triangle (T(T+1)/2 doubles, row by row).
template <typename scalar_t>
void gram_chunk(const std::vector<const scalar_t*>& slices, int64_t begin, int64_t end, double* out) {
  // fp32 and fp64 are read in place; fp16 and bf16 through an fp32 copy of the sub-block.
  constexpr bool kInPlace = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  using load_t = std::conditional_t<kInPlace, scalar_t, float>;
  const int64_t num_tasks = static_cast<int64_t>(slices.size());
  const int64_t sub = gram_sub_block(num_tasks, sizeof(load_t));
  std::vector<load_t> widened(kInPlace ? 0 : num_tasks * sub);
  std::vector<const load_t*> rows(num_tasks);
  for (int64_t s = begin; s < end; s += sub) {
    const int64_t len = std::min(sub, end - s);
    for (int64_t t = 0; t < num_tasks; ++t) {
      if constexpr (kInPlace) {
        rows[t] = slices[t] + s;
      } else {
        widen(widened.data() + t * sub, slices[t] + s, len);
        rows[t] = widened.data() + t * sub;
      }
    }
    int64_t pair = 0;
    for (int64_t i = 0; i < num_tasks; ++i)
      for (int64_t j = i; j < num_tasks; ++j) out[pair++] += dot(rows[i], rows[j], len);
  }
}

}  // namespace

// G_ij = sum_k <g_i[k], g_j[k]> for the T task lists of `grads`, a (T, T) fp64 tensor: every
// product and sum in fp64, one partial per chunk and task pair, the partials added in chunk
// order (deterministic whatever the thread count), G_ji = G_ij.
at::Tensor task_gram_cpu(at::TensorList grads, int64_t num_tasks) {
  const int64_t n = check_task_gram(c10::DeviceType::CPU, grads, num_tasks).size();
  const auto options = at::TensorOptions().dtype(at::kDouble);
  if (n == 0) return at::zeros({num_tasks, num_tasks}, options);
  const int64_t pairs = num_tasks * (num_tasks + 1) / 2;
  Workspace ws(grads.slice(0, n));  // every task's tensor k walked as task 0's tensor k
  std::vector<void*> g;
  for (int64_t t = 0; t < num_tasks; ++t)
    for (int64_t k = 0; k < n; ++k) g.push_back(ws.data(grads[t * n + k], false, k));
  std::vector<int64_t> sizes;
  for (int64_t k = 0; k < n; ++k) sizes.push_back(grads[k].numel());
  const auto chunks = make_chunks(sizes);
  std::vector<double> partial(chunks.size() * pairs, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "task_gram", [&] {
    for_each_chunk(chunks, [&](const Chunk& c, int64_t index) {
      std::vector<const scalar_t*> slices(num_tasks);
      for (int64_t t = 0; t < num_tasks; ++t) slices[t] = static_cast<scalar_t*>(g[t * n + c.tensor]);
      gram_chunk<scalar_t>(slices, c.begin, c.end, partial.data() + index * pairs);
    });
  });
  std::vector<double> total(pairs, 0.0);
  for (size_t index = 0; index < chunks.size(); ++index)
    for (int64_t p = 0; p < pairs; ++p) total[p] += partial[index * pairs + p];
  at::Tensor out = at::empty({num_tasks, num_tasks}, options);
  double* o = out.data_ptr<double>();
  int64_t pair = 0;
  for (int64_t i = 0; i < num_tasks; ++i)
    for (int64_t j = i; j < num_tasks; ++j, ++pair) o[i * num_tasks + j] = o[j * num_tasks + i] = total[pair];
  return out;
}

// out[k] <- (out[k] if accumulate else 0) + sum_t a_t g_t[k] in opmath (fp32 for fp16/bf16/fp32,
// fp64 for fp64), tasks added in order 0..T-1, one rounding to out's dtype. The coefficients are
// a CPU tensor here (checked): read on the host once, rounded to opmath as the oracle does.
void task_combine_cpu(at::TensorList out, at::TensorList grads, const at::Tensor& coefficients, bool accumulate) {
  const int64_t n = check_task_combine(c10::DeviceType::CPU, out, grads, coefficients).size();
  if (n == 0) return;
  const int64_t num_tasks = coefficients.numel();
  const at::Tensor a = coefficients.to(at::kDouble).contiguous();
  Workspace ws(out);
  std::vector<void*> o, g;
  std::vector<int64_t> sizes;
  for (int64_t k = 0; k < n; ++k) {
    o.push_back(ws.data(out[k], true, k));
    sizes.push_back(out[k].numel());
  }
  // After out's: a task tensor that is out[k] itself (or a view of it in another layout) is
  // copied, or read in place, before anything is written.
  for (int64_t t = 0; t < num_tasks; ++t)
    for (int64_t k = 0; k < n; ++k) g.push_back(ws.data(grads[t * n + k], false, k));
  const auto chunks = make_chunks(sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "task_combine_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> coef(num_tasks);
    for (int64_t t = 0; t < num_tasks; ++t) coef[t] = static_cast<opmath_t>(a.data_ptr<double>()[t]);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
      scalar_t* op = static_cast<scalar_t*>(o[c.tensor]);
      alignas(64) opmath_t acc[kCombineBlock];
      for (int64_t s = c.begin; s < c.end; s += kCombineBlock) {
        const int64_t len = std::min(kCombineBlock, c.end - s);
        combine_start<scalar_t, opmath_t>(acc, op + s, len, accumulate);
        for (int64_t t = 0; t < num_tasks; ++t)
          combine_add<scalar_t, opmath_t>(acc, static_cast<scalar_t*>(g[t * n + c.tensor]) + s, coef[t], len);
        combine_store<scalar_t, opmath_t>(op + s, acc, len);
      }
    });
  });
  ws.finish();
}

}  // namespace cl_optim
