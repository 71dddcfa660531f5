// cl_optim::per_sample_sq_accumulate_ on the CPU: out (M, N) fp32 += sum_b (deltas[b]^T inputs[b])^2
// for deltas (B, R, M) and inputs (B, R, N) — the per-sample squares of a sequence Linear, an
// attention projection or a recurrent weight (the math and the oracle: cl_optim/fisher/squares.py).
// Small M x N with long R below is the im2col form of a first convolution, the hardest shape.
//
// The per-sample products G_b (M x N each) are never all held: out is walked in tiles of rows,
// and for each tile a chunk of samples goes through one batched GEMM (ATen's bmm: MKL or the
// build's BLAS, both threads) into a scratch of at most kScratchFloats, which is squared into the
// tile while it is still in cache. So memory is out plus the scratch, and the passes over the
// products that the chunked bmm + square_ + sum(0) + add_ of the oracle makes through memory
// (about 3 x B x M x N x 4 bytes) stay in cache. The GEMM work is the batched weight gradient's.
//
// Each element of out adds its samples' squares in sample order whatever the thread count, so
// the result is deterministic; it differs from the oracle's (which sums a chunk first, then adds)
// by rounding only.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <algorithm>

#include "multi_tensor.h"
#include "../op_checks.h"

namespace cl_optim {
namespace {

// 256 KiB of fp32 products per GEMM call: half an L2 of a Zen core, a quarter of a recent Xeon's,
// and large enough that one call holds several samples of a mid-size layer (a call costs a few us).
constexpr int64_t kScratchFloats = 64 * 1024;
// Products of a whole batch small enough to form at once (4 MiB, well inside a last-level cache).
constexpr int64_t kWholeBatchFloats = 1024 * 1024;

// tile[e] += sum_j products[j][e]^2 for e in [begin, end), j < count (products j*stride apart):
// samples in order per element, whatever splits the range.
template <typename Acc>
CLO_CPU_CLONES void add_squares(float* __restrict__ tile, const Acc* __restrict__ products, int64_t stride,
                                int64_t count, int64_t begin, int64_t end) {
  for (int64_t j = 0; j < count; ++j) {
    const Acc* p = products + j * stride;
    for (int64_t e = begin; e < end; ++e) {
      const Acc v = p[e];
      tile[e] = static_cast<float>(static_cast<Acc>(tile[e]) + v * v);
    }
  }
}

}  // namespace

void per_sample_sq_accumulate_cpu(const at::Tensor& out, const at::Tensor& deltas, const at::Tensor& inputs) {
  check_per_sample_sq(c10::DeviceType::CPU, out, deltas, inputs);
  const int64_t batch = deltas.size(0), m = deltas.size(2), n = inputs.size(2);
  if (batch == 0 || m == 0 || n == 0 || deltas.size(1) == 0) return;  // no products, or all zero
  // fp16/bf16 in fp32 (as the GPU kernels compute them); fp64 products and squares in fp64, each
  // sample's square added to out's fp32 value (one rounding per sample).
  const auto compute = deltas.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Detached: the GEMMs below are this op's own arithmetic, not something autograd records (a
  // nested bmm_out on inputs that require grad would refuse to run).
  const at::Tensor d = deltas.detach().to(compute), x = inputs.detach().to(compute);
  // A small layer (every sample's products together within kWholeBatchFloats, a first
  // convolution's 32 x 27): one batched GEMM over the whole batch, threaded by the BLAS across
  // samples, then squared with the elements split between threads. Tiling it would leave GEMMs
  // of a few rows, which the BLAS runs far below its speed.
  if (batch * m * n <= kWholeBatchFloats) {
    at::Tensor products = at::bmm(d.transpose(1, 2), x);  // (B, M, N)
    at::Tensor target = out.is_contiguous() ? out : out.contiguous();
    float* const base = target.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "per_sample_sq_accumulate_", [&] {
      const scalar_t* p = products.const_data_ptr<scalar_t>();
      at::parallel_for(0, m * n, 4096, [&](int64_t begin, int64_t end) {
        add_squares<scalar_t>(base, p, m * n, batch, begin, end);
      });
    });
    if (!target.is_same(out)) out.copy_(target);
    return;
  }
  // Tiles of out: the whole matrix, halved until a tile's products for one sample fit the scratch
  // and every thread has two tiles (a layer with few outputs keeps both cores busy). Each cut
  // re-reads one operand once more per sample: cutting rows re-reads the inputs (R x N per
  // sample), cutting columns the deltas (R x M), so the longer side is cut (a convolution's wide
  // im2col patches are read once, a wide Linear's deltas are).
  const int64_t threads = at::get_num_threads();
  int64_t tile_rows = m, tile_cols = n;
  auto tiles = [&] { return ((m + tile_rows - 1) / tile_rows) * ((n + tile_cols - 1) / tile_cols); };
  while (tile_rows * tile_cols > kScratchFloats || tiles() < threads) {
    const bool cut_rows = tile_rows >= tile_cols ? tile_rows > 8 : tile_cols <= 64;
    if (cut_rows && tile_rows > 8) {
      tile_rows = (tile_rows + 1) / 2;
    } else if (tile_cols > 64) {
      tile_cols = (tile_cols + 1) / 2;
    } else if (tile_rows * tile_cols > kScratchFloats && tile_rows > 1) {
      tile_rows = (tile_rows + 1) / 2;
    } else {
      break;  // small enough: fewer tiles than threads is better than slivers
    }
  }
  const int64_t row_tiles = (m + tile_rows - 1) / tile_rows, col_tiles = (n + tile_cols - 1) / tile_cols;
  const int64_t width = tile_cols;
  const int64_t chunk = std::clamp<int64_t>(kScratchFloats / (tile_rows * width), 1, batch);
  // The tiles are summed into in place; out may be any dense layout, then it is copied back.
  const bool direct = out.is_contiguous();
  at::Tensor target = direct ? out : out.contiguous();
  float* const base = target.data_ptr<float>();
  // One scratch per thread, allocated once (a fresh 256 KiB block per tile would be mapped anew).
  at::Tensor scratch = at::empty({threads, chunk * tile_rows * width}, d.options());
  // The workers run ATen ops (bmm_out) under the caller's thread-local state: grad mode,
  // inference mode and the dispatch keys do not reach parallel_for's threads by themselves.
  const at::ThreadLocalState caller_state;
  // Each tile belongs to one thread: no atomics, and a result that does not depend on the split.
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t first_tile, int64_t last_tile) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor mine = scratch[at::get_thread_num()];
    for (int64_t t = first_tile; t < last_tile; ++t) {
      const int64_t row = (t / col_tiles) * tile_rows, col = (t % col_tiles) * width;
      const int64_t rows = std::min(tile_rows, m - row), cols = std::min(width, n - col);
      at::Tensor left = d.narrow(2, row, rows).transpose(1, 2), right = x.narrow(2, col, cols);
      for (int64_t first = 0; first < batch; first += chunk) {
        const int64_t count = std::min(chunk, batch - first);
        at::Tensor products = mine.narrow(0, 0, count * rows * cols).view({count, rows, cols});
        at::bmm_out(products, left.narrow(0, first, count), right.narrow(0, first, count));
        AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "per_sample_sq_accumulate_", [&] {
          const scalar_t* p = products.const_data_ptr<scalar_t>();
          for (int64_t r = 0; r < rows; ++r)
            add_squares<scalar_t>(base + (row + r) * n + col, p + r * cols, rows * cols, count, 0, cols);
        });
      }
    }
  });
  if (!direct) out.copy_(target);
}

}  // namespace cl_optim
