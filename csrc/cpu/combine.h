// The combine loops shared by task_combine_ and the COMBINE term of the SGD/AdamW steps:
// out <- (out or 0) + sum_t a_t * g_t, a sub-block at a time through an opmath buffer.
#pragma once

#include <algorithm>

#include "multi_tensor.h"

namespace cl_optim {
// Internal linkage, as the other per-chunk loops: each translation unit has its own multiversioned
// (target_clones) copies.
namespace {

// Elements per sub-block of the combine: the opmath accumulators of one sub-block (4 or 8 KiB).
constexpr int64_t kCombineBlock = 1024;

// The combine runs a sub-block at a time through an opmath buffer: acc <- out or 0, then
// acc += a_t * g_t for t = 0..T-1, then out <- round(acc). Every read of a sub-block comes before
// its writes, so `out` may be one of the task lists (the same tensor as g_t) with each loop's
// pointers restrict-qualified honestly: no loop both reads g_t and writes out.
template <typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void combine_start(opmath_t* __restrict__ acc, const scalar_t* __restrict__ out, int64_t len,
                                  bool accumulate) {
  if (accumulate) {
    for (int64_t e = 0; e < len; ++e) acc[e] = static_cast<opmath_t>(out[e]);
  } else {
    for (int64_t e = 0; e < len; ++e) acc[e] = opmath_t(0);  // 0 + a*g, as the oracle: -0 becomes +0
  }
}

template <typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void combine_add(opmath_t* __restrict__ acc, const scalar_t* __restrict__ g, opmath_t a,
                                int64_t len) {
  for (int64_t e = 0; e < len; ++e) acc[e] = acc[e] + a * static_cast<opmath_t>(g[e]);
}

template <typename scalar_t, typename opmath_t>
CLO_CPU_CLONES void combine_store(scalar_t* __restrict__ out, const opmath_t* __restrict__ acc, int64_t len) {
  for (int64_t e = 0; e < len; ++e) out[e] = static_cast<scalar_t>(acc[e]);
}

}  // namespace
}  // namespace cl_optim
