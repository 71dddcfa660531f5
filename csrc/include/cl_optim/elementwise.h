// Per-element math of every fused op of cl_optim (DESIGN.md §3), written once for the CPU loops
// (csrc/cpu) and the CUDA kernels (csrc/cuda). Only launch geometry, vector widths and
// reductions differ per backend; what happens to one element is defined here.
//
// Everything is computed in `T`, the op-math type (float for fp16/bf16/fp32 parameters, double
// for fp64), and follows the order of the Python oracle (cl_optim/_terms.py):
//   RESTORE -> AMP unscale -> FISHER_EMA -> CLIP -> maximize -> EWC -> base update.
// This header includes nothing from torch so that .cu files stay light to compile.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CLO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined: the CPU loops vectorise only when the per-element functions disappear into them.
#define CLO_HD inline __attribute__((always_inline))
#else
#define CLO_HD inline
#endif

namespace cl_optim {

// sqrt in the op-math type: float stays float (an unqualified sqrt(float) may resolve to the
// double C function on the host, which neither vectorises nor matches the oracle's rounding).
template <typename T>
CLO_HD T op_sqrt(T x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Element conversions between the storage type S and the op-math type T. Explicit, because torch
// builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (no
// implicit __half <-> float); stores round to nearest even. On the host, c10::Half/BFloat16 convert.
template <typename T, typename S>
struct Convert {
  static CLO_HD T load(S x) { return static_cast<T>(x); }
  static CLO_HD S store(T x) { return static_cast<S>(x); }
};
#if defined(__CUDACC__)
template <>
struct Convert<float, __half> {
  static CLO_HD float load(__half x) { return __half2float(x); }
  static CLO_HD __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<float, __nv_bfloat16> {
  static CLO_HD float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static CLO_HD __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
#endif

template <typename T, typename S>
CLO_HD T load_as(S x) {
  return Convert<T, S>::load(x);
}

template <typename S, typename T>
CLO_HD S store_as(T x) {
  return Convert<T, S>::store(x);
}

// The optional terms applied to the task gradient before the base update. Complements such as
// 1 - beta are computed by the host in double and rounded once, as the Python oracle does.
// Terms that read extra memory (FISHER, EWC) are compile-time flags; the others are factors
// that are exact when off (x * 1, x * -1), so the loops stay branch-free and vectorise.
template <typename T>
struct GradTerms {
  T inv_scale = T(1);  // AMP: 1/grad_scale
  T clip_coef = T(1);  // CLIP
  T sign = T(1);       // maximize: -1
  T fisher_beta = T(0), fisher_one_minus_beta = T(1);  // FISHER_EMA
};

template <typename T>
CLO_HD GradTerms<T> make_grad_terms(T inv_scale, T clip_coef, bool maximize, T fisher_beta, T fisher_one_minus_beta) {
  GradTerms<T> terms;
  terms.inv_scale = inv_scale;
  terms.clip_coef = clip_coef;
  terms.sign = maximize ? T(-1) : T(1);
  terms.fisher_beta = fisher_beta;
  terms.fisher_one_minus_beta = fisher_one_minus_beta;
  return terms;
}

// g -> the gradient the base update sees: unscale, Fisher EMA of the task gradient (before
// clipping and the EWC pull), clip, maximize, EWC pull lam * A * (p - mu).
template <bool FISHER, bool EWC, typename T>
CLO_HD T task_grad(T g, T p, float& fisher, T precision, T anchor, T ewc_lam, const GradTerms<T>& terms) {
  g = g * terms.inv_scale;
  if constexpr (FISHER) {
    const T f = static_cast<T>(fisher);
    fisher = static_cast<float>(f * terms.fisher_beta + terms.fisher_one_minus_beta * g * g);
  }
  g = g * terms.clip_coef * terms.sign;
  if constexpr (EWC) g = g + ewc_lam * precision * (p - anchor);
  return g;
}

// The first half of every fused step at element i, shared by the SGD and AdamW loops and kernels:
// RESTORE (read the weight from `save`), then the task gradient with its optional terms, from the
// gradient value `grad` (COMBINE's combination where that term is on). Sets `p` (op-math) and
// returns the gradient the base update sees. Pointers a flag switches off are never read.
template <bool SAVE, bool FISHER, bool EWC, typename T, typename S>
CLO_HD T restored_task_grad_of(const S* param, const S* save, T grad, float* fisher, const float* precision,
                               const float* anchor, int64_t i, T ewc_lam, const GradTerms<T>& terms, T& p) {
  p = load_as<T>(SAVE ? save[i] : param[i]);
  float unused = 0.f;
  float& f = FISHER ? fisher[i] : unused;
  return task_grad<FISHER, EWC>(grad, p, f, EWC ? static_cast<T>(precision[i]) : T(0),
                                EWC ? static_cast<T>(anchor[i]) : T(0), ewc_lam, terms);
}

// The same with the gradient read from `grad` at element i.
template <bool SAVE, bool FISHER, bool EWC, typename T, typename S>
CLO_HD T restored_task_grad(const S* param, const S* save, const S* grad, float* fisher, const float* precision,
                            const float* anchor, int64_t i, T ewc_lam, const GradTerms<T>& terms, T& p) {
  return restored_task_grad_of<SAVE, FISHER, EWC>(param, save, load_as<T>(grad[i]), fisher, precision, anchor, i,
                                                  ewc_lam, terms, p);
}

template <typename T>
struct SgdParams {
  T lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov;
};

// torch.optim.SGD. With MOMENTUM, `buf_ready` false is the first step: the buffer becomes g.
template <bool MOMENTUM, typename T>
CLO_HD void sgd_update(T& p, T g, T& buf, bool buf_ready, const SgdParams<T>& a) {
  g = a.weight_decay != T(0) ? g + a.weight_decay * p : g;  // 0 * inf must not reach g
  if constexpr (MOMENTUM) {
    const T b = buf_ready ? buf * a.momentum + a.one_minus_dampening * g : g;
    buf = b;
    g = a.nesterov ? g + a.momentum * b : b;
  }
  p = p - a.lr * g;
}

template <typename T>
struct AdamWParams {
  T decay;                  // 1 - lr * weight_decay (exactly 1: no decay)
  T one_minus_beta1, beta2, one_minus_beta2, eps;
  T step_size;              // lr / (1 - beta1^t), per tensor
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t), per tensor
};

// torch.optim.AdamW; AMSGRAD keeps the running maximum `vmax` of v.
template <bool AMSGRAD, typename T>
CLO_HD void adamw_update(T& p, T g, T& m, T& v, T& vmax, const AdamWParams<T>& a) {
  p = p * a.decay;
  // torch's lerp(m, g, w), w = 1 - beta1: m + w (g - m) for |w| < 0.5, else g - (g - m) (1 - w), so
  // that w = 1 (beta1 = 0) gives exactly g however large m is (the first form cancels to 0 for
  // m = 1e8, g = 1). The condition is the same for every element: no divergence, and the CPU
  // loops compute both and select.
  const T w = a.one_minus_beta1, diff = g - m;
  m = (w < T(0.5) && w > T(-0.5)) ? m + w * diff : g - diff * (T(1) - w);
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  T second = v;
  if constexpr (AMSGRAD) {
    // torch.maximum: a NaN on either side wins (vmax > v ? vmax : v drops a NaN in vmax). Bitwise
    // |, not ||: no short-circuit branch in the vectorised loops.
    vmax = ((v > vmax) | (v != v)) ? v : vmax;
    second = vmax;
  }
  const T denom = op_sqrt(second) / a.bias_correction2_sqrt + a.eps;
  p = p - a.step_size * (m / denom);
}

// SAM's per-element weight T of the perturbation e = s * T^2 * g and of the norm ||T g||, one
// kind per tensor (SamWeight): 1 for SAM; |p| + eta for ASAM; for Fisher-SAM (Kim et al., ICML
// 2022) T^2 = 1 / (1 + eta * F) with F the squared batch gradient g^2 (the paper's form) or a
// running diagonal Fisher (cl_optim's fisher_ema buffer, read before this step updates it).
enum SamWeight : int { kSamPlain = 0, kSamAsam = 1, kSamFisherBatch = 2, kSamFisherRunning = 3 };

// ASAM weight of one element: |p| + eta where the tensor is normalised, else 1.
template <typename T>
CLO_HD T asam_weight(T p, bool weighted, T eta) {
  return weighted ? (p < T(0) ? -p : p) + eta : T(1);
}

// T^2 of one element; `fisher` is read only by kSamFisherRunning.
template <int KIND, typename T>
CLO_HD T sam_weight_sq(T p, T g, T fisher, T eta) {
  if constexpr (KIND == kSamPlain) {
    return T(1);
  } else if constexpr (KIND == kSamAsam) {
    const T w = asam_weight<T>(p, true, eta);
    return w * w;
  } else if constexpr (KIND == kSamFisherBatch) {
    return T(1) / (T(1) + eta * g * g);
  } else {
    return T(1) / (T(1) + eta * fisher);
  }
}

// (T g)^2 of one element, computed in the accumulation type A (double: the square of any finite
// fp32 gradient, and the sum of many, is a finite double — a gradient of 1e20 has a finite
// norm, which an fp32 square would turn into inf). SAM and ASAM square T*g, as the oracle (and
// davda54) do; Fisher-SAM multiplies g^2 by T^2 (no square root of 1 / (1 + eta F)).
template <int KIND, typename A, typename T>
CLO_HD A sam_norm_term(T p, T g, T fisher, T eta) {
  if constexpr (KIND == kSamPlain || KIND == kSamAsam) {
    const A tg = static_cast<A>(asam_weight<T>(p, KIND == kSamAsam, eta)) * static_cast<A>(g);
    return tg * tg;
  } else {
    const A ga = static_cast<A>(g);
    return ga * ga * sam_weight_sq<KIND, A>(static_cast<A>(p), ga, static_cast<A>(fisher), static_cast<A>(eta));
  }
}

// SAM: the perturbation scale * T^2 * g. A non-finite result (scale 0 times an inf/nan
// gradient) moves nothing.
template <typename T>
CLO_HD T sam_perturbation(T g, T weight_sq, T scale) {
  const T e = weight_sq * g * scale;
  // Bitwise &, not &&: no short-circuit branch, so the CPU loops stay vectorisable.
  const bool finite = (e == e) & (e - e == T(0));
  return finite ? e : T(0);
}

// fisher_accumulate_: F += w * g^2.
template <typename T>
CLO_HD float fisher_accumulate(float f, T g, T w) {
  return static_cast<float>(static_cast<T>(f) + w * g * g);
}

// ewc_grad_add_: g + lam * A * (p - mu); ewc_penalty term: A * (p - mu)^2.
template <typename T>
CLO_HD T ewc_pull(T g, T p, T precision, T anchor, T lam) {
  return g + lam * precision * (p - anchor);
}

template <typename T>
CLO_HD T ewc_penalty_term(T p, T precision, T anchor) {
  const T d = p - anchor;
  return precision * d * d;
}

// ewc_consolidate_ of one element, in fp32 (A and mu are fp32): A' = decay*A + weight*F and
// mu' = (decay*A*mu + weight*F*p) / A' (p where A' = 0) with WEIGHTED_ANCHOR, else mu' = p.
// Returns decay*A * weight*F / A' * (mu - p)^2, this element's increment of the constant that
// makes the collapsed penalty equal the sum of the separate ones (0 without WEIGHTED_ANCHOR).
template <bool WEIGHTED_ANCHOR>
CLO_HD float ewc_consolidate(float& precision, float& anchor, float fisher, float theta, float decay, float weight) {
  const float old = decay * precision, fresh = weight * fisher, total = old + fresh;
  float gap = 0.f;
  if (WEIGHTED_ANCHOR && total > 0.f) {
    const float diff = anchor - theta;
    gap = old * fresh / total * diff * diff;
    anchor = (old * anchor + fresh * theta) / total;
  } else {
    anchor = theta;
  }
  precision = total;
  return gap;
}

}  // namespace cl_optim
