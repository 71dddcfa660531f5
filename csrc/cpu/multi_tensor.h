// Multi-tensor CPU loops: the elements of every tensor of a (device, dtype) group are cut into
// fixed-size chunks, and at::parallel_for runs over the chunk list, so many small tensors cost
// one parallel region rather than one each. Reductions keep one partial per chunk and add them
// in chunk order: the result does not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cl_optim/flags.h>

#include "../op_checks.h"

#include <vector>

namespace cl_optim {

// Per-chunk loops are compiled twice, for the x86-64 baseline (SSE2) and for AVX2, and the
// loader picks the best one the CPU runs (GCC function multiversioning: no -march=native in
// anything built, yet 32-byte vectors where the machine has them).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CL_OPTIM_NO_CLONES)
#define CLO_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLO_CPU_CLONES
#endif

constexpr int64_t kChunk = 1 << 15;  // elements per work item: 128 KiB of fp32

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(sizes.size()); ++t)
    for (int64_t b = 0; b < sizes[t]; b += kChunk) chunks.push_back({t, b, std::min(sizes[t], b + kChunk)});
  return chunks;
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) f(chunks[i], i);
  });
}

// The tensors of an op as the kernels walk them: each entry i in the layout of its lead tensor
// (its parameter) when that is dense, else contiguous. A tensor already in that layout is used in
// place (a channels_last weight with channels_last state costs no copy); any other is worked on in
// a copy of that layout, which finish() writes back when the op writes it.
//
// data() hands out raw data pointers, not tensor handles: a handle copied per tensor costs a
// reference-count round trip through its Python object (and the GIL) when it is dropped, which
// on thousands of small tensors cost more than their update.
class Workspace {
 public:
  explicit Workspace(at::TensorList lead) : lead_(lead) {}

  // Where the kernels read (and, when `written`, write) entry i of a list: nullptr for an
  // undefined tensor.
  void* data(const at::Tensor& t, bool written, int64_t i) {
    if (!t.defined()) return nullptr;
    const at::Tensor& like = lead_[i];
    if (walks_as(t, like)) return written ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    at::Tensor copy = like.is_non_overlapping_and_dense() ? at::empty_like(like, t.options())
                                                          : at::empty(t.sizes(), t.options());
    copy.copy_(t);
    void* out = copy.mutable_data_ptr();
    if (written) {
      writes_.emplace_back(t, std::move(copy));
    } else {
      reads_.push_back(std::move(copy));
    }
    return out;
  }
  void finish() {
    for (auto& [dst, src] : writes_) dst.copy_(src);
  }

 private:
  at::TensorList lead_;
  std::vector<std::pair<at::Tensor, at::Tensor>> writes_;
  std::vector<at::Tensor> reads_;  // the copies read from, alive until the op returns
};

// The value of an optional one-element tensor on the CPU, or `fallback`.
inline double scalar_or(const std::optional<at::Tensor>& t, double fallback) {
  return t.has_value() && t->defined() ? t->to(at::kDouble).item<double>() : fallback;
}

}  // namespace cl_optim
