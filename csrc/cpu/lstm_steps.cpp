// The step loops of the per-sample Fisher's LSTM rule on the CPU (cl_optim/fisher/lstm_steps.py
// holds the math and the oracle): lstm_forward_steps_ runs one layer and direction forward,
// keeping what the rule's backward needs, and lstm_backward_steps_ runs the rule's backward
// recurrence. Each step is one GEMM (ATen's addmm) and one pass over the step's B x H units that
// does every elementwise operation of the step: written in Python they were eight to ten ops a
// step, each a dispatch and a pass over memory, and torch's CPU tanh costs about 2 ns an element
// here (sigmoid 0.6 ns), more than the step's GEMM (bench_fisher's LSTM, B 128, H 128).
//
// fp32 takes sigmoid and tanh from one exp written out (Cephes' expf: range reduction by ln 2 in
// two parts, a degree-5 polynomial; tanh's small arguments from Cephes' odd polynomial), branch
// free so that the compiler vectorises the pass (about 2 ulp against torch's functions); fp64
// takes the C library's.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "multi_tensor.h"
#include "../op_checks.h"

namespace cl_optim {
namespace {

// Written so that GCC vectorises the loops that call them (-O3, no fast-math): rounding to the
// nearest integer by adding and taking away 1.5 * 2^23 (std::floor is a library call here), and
// a select (also the clamp: std::min/max become branches once inlined into exp) as a bitwise blend
// of two computed values (with trapping math a ?: is a branch).
inline float round_to_int(float v) { return (v + 12582912.0f) - 12582912.0f; }  // |v| < 2^22

inline float blend(bool take_first, float first, float second) {
  uint32_t a, b;
  std::memcpy(&a, &first, sizeof(a));
  std::memcpy(&b, &second, sizeof(b));
  const uint32_t mask = 0u - static_cast<uint32_t>(take_first);
  const uint32_t bits = (a & mask) | (b & ~mask);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float exp_f32(float x) {
  x = blend(x < -87.33654f, -87.33654f, blend(x > 88.37626f, 88.37626f, x));  // e^x a normal float
  const float n = round_to_int(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float sigmoid_of(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_of(float x) {
  const float a = std::fabs(x);
  const float z = x * x;  // |x| < 0.625: the odd polynomial, accurate where 1 - 2/(e^2x + 1) cancels
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) *
          z * x +
      x;
  const float large = std::copysign(1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f), x);
  return blend(a < 0.625f, small, large);
}
inline double tanh_of(double x) { return std::tanh(x); }

// One forward step's units of rows [first, last): z holds the gate pre-activations (B, 4H), left
// with i, f, o after their sigmoid (the g quarter as it was); c_t and h_t go to their rows, and
// what the backward needs of the step: factors (B, 4H) [(1-i) i g, (1-f) f c_{t-1}, (1-g^2) i,
// (1-o) o tanh(c_t)] and through (B, H) o (1 - tanh^2 c_t), in the order of operations of the
// rule's torch form (cl_optim/fisher/recurrent.py), so both round alike.
// One row (one sample) of a forward step; every stream its own restrict pointer, so that GCC
// sees they do not overlap (offsets of one base by a runtime H it cannot tell apart).
template <typename scalar_t>
CLO_CPU_CLONES void forward_row(scalar_t* __restrict__ zi, scalar_t* __restrict__ zf, const scalar_t* __restrict__ zg,
                                scalar_t* __restrict__ zo, const scalar_t* __restrict__ cb, scalar_t* __restrict__ cn,
                                scalar_t* __restrict__ fi, scalar_t* __restrict__ ff, scalar_t* __restrict__ fg,
                                scalar_t* __restrict__ fo, scalar_t* __restrict__ th, scalar_t* __restrict__ hn,
                                int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const scalar_t i_gate = sigmoid_of(zi[j]), f_gate = sigmoid_of(zf[j]), o_gate = sigmoid_of(zo[j]);
    const scalar_t g_gate = tanh_of(zg[j]);
    const scalar_t cell = f_gate * cb[j] + i_gate * g_gate;
    const scalar_t tanh_cell = tanh_of(cell);
    zi[j] = i_gate;
    zf[j] = f_gate;
    zo[j] = o_gate;
    cn[j] = cell;
    hn[j] = o_gate * tanh_cell;
    fi[j] = (1 - i_gate) * i_gate * g_gate;
    ff[j] = (1 - f_gate) * f_gate * cb[j];
    fg[j] = (1 - g_gate * g_gate) * i_gate;
    fo[j] = (1 - o_gate) * o_gate * tanh_cell;
    th[j] = (1 - tanh_cell * tanh_cell) * o_gate;
  }
}

// One forward step's rows [first, last): z holds the gate pre-activations (B, 4H), left with
// i, f, o after their sigmoid (the g quarter as it was); c_t and h_t go to their rows, and what
// the backward needs of the step: factors (B, 4H) [(1-i) i g, (1-f) f c_{t-1}, (1-g^2) i,
// (1-o) o tanh(c_t)] and through (B, H) o (1 - tanh^2 c_t), in the order of operations of
// cl_optim/fisher/lstm_steps.py's step_factors_, so both round alike.
template <typename scalar_t>
void forward_units(scalar_t* z, const scalar_t* c_before, scalar_t* c, scalar_t* factors, scalar_t* through,
                   scalar_t* h, int64_t h_row_stride, int64_t hidden, int64_t first, int64_t last) {
  for (int64_t b = first; b < last; ++b) {
    scalar_t* zb = z + b * 4 * hidden;
    scalar_t* fb = factors + b * 4 * hidden;
    forward_row<scalar_t>(zb, zb + hidden, zb + 2 * hidden, zb + 3 * hidden, c_before + b * hidden, c + b * hidden, fb,
                          fb + hidden, fb + 2 * hidden, fb + 3 * hidden, through + b * hidden, h + b * h_row_stride,
                          hidden);
  }
}

// One row of a backward step: dc = dc_next + dh * through; the step's factors times
// (dc, dc, dc, dh) are its gate gradients dz; dc_next <- dc * f for the step before.
template <typename scalar_t>
CLO_CPU_CLONES void backward_row(scalar_t* __restrict__ di, scalar_t* __restrict__ df, scalar_t* __restrict__ dg,
                                 scalar_t* __restrict__ do_, const scalar_t* __restrict__ fi,
                                 const scalar_t* __restrict__ ff, const scalar_t* __restrict__ fg,
                                 const scalar_t* __restrict__ fo, const scalar_t* __restrict__ th,
                                 const scalar_t* __restrict__ f, const scalar_t* __restrict__ dh,
                                 scalar_t* __restrict__ dcn, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const scalar_t dc = dcn[j] + dh[j] * th[j];
    di[j] = fi[j] * dc;
    df[j] = ff[j] * dc;
    dg[j] = fg[j] * dc;
    do_[j] = fo[j] * dh[j];
    dcn[j] = dc * f[j];
  }
}

template <typename scalar_t>
void backward_units(scalar_t* dz, const scalar_t* factors, const scalar_t* through, const scalar_t* gates,
                    const scalar_t* dh, scalar_t* dc_next, int64_t hidden, int64_t first, int64_t last) {
  for (int64_t b = first; b < last; ++b) {
    scalar_t* out = dz + b * 4 * hidden;
    const scalar_t* in = factors + b * 4 * hidden;
    backward_row<scalar_t>(out, out + hidden, out + 2 * hidden, out + 3 * hidden, in, in + hidden, in + 2 * hidden,
                           in + 3 * hidden, through + b * hidden, gates + b * 4 * hidden + hidden, dh + b * hidden,
                           dc_next + b * hidden, hidden);
  }
}

constexpr const char* kForward = "lstm_forward_steps_";
constexpr const char* kBackward = "lstm_backward_steps_";

void check_lstm(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like,
                bool contiguous) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name,
              " must be a dense CPU tensor, got one on ", t.device(), " with layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", the gates ",
              like.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
  if (contiguous) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  } else {
    TORCH_CHECK(t.dim() < 1 || t.stride(-1) == 1 || t.size(-1) <= 1, op, ": ", name,
                " must have unit stride in its last dimension, got strides ", t.strides());
  }
}

// The kernels read and write through restrict pointers: no written tensor may share memory with
// another argument.
void check_apart(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> written,
                 std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o)
      TORCH_CHECK(!bytes_overlap(*w->second, *o->second), op, ": ", w->first, " shares memory with ", o->first);
    for (const auto& o : others)
      TORCH_CHECK(!bytes_overlap(*w->second, *o.second), op, ": ", w->first, " shares memory with ", o.first);
  }
}

void check_gates(const char* op, const at::Tensor& gates) {
  TORCH_CHECK(gates.defined() && gates.dim() == 3 && gates.size(2) % 4 == 0, op,
              ": gates must be a (T, B, 4H) tensor, got ",
              gates.defined() ? c10::str(gates.sizes()) : std::string("None"));
  TORCH_CHECK(gates.scalar_type() == at::kFloat || gates.scalar_type() == at::kDouble, op, ": gates are ",
              gates.scalar_type(), "; this kernel takes fp32 or fp64");
}

}  // namespace

void lstm_forward_steps_cpu(const at::Tensor& gates, const at::Tensor& output, const at::Tensor& states,
                            const at::Tensor& factors, const at::Tensor& through, const at::Tensor& w_hh,
                            const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check_gates(kForward, gates);
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = gates.size(2) / 4;
  check_lstm(kForward, gates, "gates", gates.sizes(), gates, true);
  check_lstm(kForward, output, "output", {steps, batch, hidden}, gates, false);
  check_lstm(kForward, states, "states", {steps + 1, batch, hidden}, gates, true);
  check_lstm(kForward, factors, "factors", gates.sizes(), gates, true);
  check_lstm(kForward, through, "through", {steps, batch, hidden}, gates, true);
  check_lstm(kForward, w_hh, "w_hh", {4 * hidden, hidden}, gates, false);
  check_lstm(kForward, h0, "h0", {batch, hidden}, gates, false);
  check_lstm(kForward, c0, "c0", {batch, hidden}, gates, false);
  check_apart(kForward,
              {{"gates", &gates}, {"output", &output}, {"states", &states}, {"factors", &factors}, {"through", &through}},
              {{"w_hh", &w_hh}, {"h0", &h0}, {"c0", &c0}});
  if (steps == 0 || batch == 0 || hidden == 0) return;
  // The initial cell at the end the direction starts from: states[t] is c_{t-1} going forward.
  states[reverse ? steps : 0].copy_(c0.detach());
  // Detached: the GEMMs are this op's own arithmetic, not something autograd records.
  const at::Tensor w_hh_t = w_hh.detach().t();
  at::Tensor h = h0.detach();
  const int64_t grain = std::max<int64_t>(1, batch / std::max<int64_t>(1, at::get_num_threads()));
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), kForward, [&] {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      at::Tensor z = gates[t];
      z.addmm_(h, w_hh_t);
      at::Tensor out_t = output[t];
      scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* cb = states[reverse ? t + 1 : t].const_data_ptr<scalar_t>();
      scalar_t* cp = states[reverse ? t : t + 1].data_ptr<scalar_t>();
      scalar_t* fp = factors[t].data_ptr<scalar_t>();
      scalar_t* tp = through[t].data_ptr<scalar_t>();
      scalar_t* hp = out_t.data_ptr<scalar_t>();
      const int64_t h_stride = out_t.stride(0);
      at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
        forward_units<scalar_t>(zp, cb, cp, fp, tp, hp, h_stride, hidden, first, last);
      });
      h = out_t;
    }
  });
}

void lstm_backward_steps_cpu(const at::Tensor& dz, const at::Tensor& factors, const at::Tensor& through,
                             const at::Tensor& gates, const at::Tensor& d_own, const at::Tensor& w_hh,
                             const at::Tensor& dh_last, const at::Tensor& dc_last, bool reverse) {
  check_gates(kBackward, gates);
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = gates.size(2) / 4;
  check_lstm(kBackward, gates, "gates", gates.sizes(), gates, true);
  check_lstm(kBackward, dz, "dz", gates.sizes(), gates, true);
  check_lstm(kBackward, factors, "factors", gates.sizes(), gates, true);
  check_lstm(kBackward, through, "through", {steps, batch, hidden}, gates, true);
  check_lstm(kBackward, d_own, "d_own", {steps, batch, hidden}, gates, false);
  check_lstm(kBackward, w_hh, "w_hh", {4 * hidden, hidden}, gates, false);
  check_lstm(kBackward, dh_last, "dh_last", {batch, hidden}, gates, false);
  check_lstm(kBackward, dc_last, "dc_last", {batch, hidden}, gates, false);
  check_apart(kBackward, {{"dz", &dz}},
              {{"factors", &factors}, {"through", &through}, {"gates", &gates}, {"d_own", &d_own}, {"w_hh", &w_hh},
               {"dh_last", &dh_last}, {"dc_last", &dc_last}});
  if (steps == 0 || batch == 0 || hidden == 0) return;
  // Against the direction of travel: the last step first.
  const int64_t first_step = reverse ? 0 : steps - 1;
  const at::Tensor d_out = d_own.detach(), w = w_hh.detach();
  at::Tensor dh = d_out[first_step] + dh_last.detach();  // contiguous (B, H)
  at::Tensor dc_next = dc_last.detach().clone(at::MemoryFormat::Contiguous);
  const int64_t grain = std::max<int64_t>(1, batch / std::max<int64_t>(1, at::get_num_threads()));
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), kBackward, [&] {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? s : steps - 1 - s;
      at::Tensor dz_t = dz[t];
      scalar_t* op = dz_t.data_ptr<scalar_t>();
      const scalar_t* fp = factors[t].const_data_ptr<scalar_t>();
      const scalar_t* tp = through[t].const_data_ptr<scalar_t>();
      const scalar_t* gp = gates[t].const_data_ptr<scalar_t>();
      const scalar_t* dp = dh.const_data_ptr<scalar_t>();
      scalar_t* cp = dc_next.data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
        backward_units<scalar_t>(op, fp, tp, gp, dp, cp, hidden, first, last);
      });
      if (s + 1 < steps) {
        const int64_t next = reverse ? t + 1 : t - 1;
        at::addmm_out(dh, d_out[next], dz_t, w);
      }
    }
  });
}

}  // namespace cl_optim
