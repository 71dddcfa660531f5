// with_flags(f, b0, b1, ...) calls f(std::bool_constant<b0>{}, std::bool_constant<b1>{}, ...):
// runtime on/off switches of a fused op become template parameters, so each combination is its
// own branch-free loop or kernel (`if constexpr` inside). Shared by the CPU and CUDA launchers.
#pragma once

#include <stdexcept>
#include <type_traits>

namespace cl_optim {

template <typename F>
void with_flags(const F& f) {
  f();
}

template <typename F, typename... Rest>
void with_flags(const F& f, bool first, Rest... rest) {
  auto bind = [&](auto flag) {
    with_flags([&](auto... more) { f(flag, more...); }, rest...);
  };
  if (first)
    bind(std::true_type{});
  else
    bind(std::false_type{});
}

// with_sam_weight(kind, f) calls f(std::integral_constant<int, kind>{}) for a SamWeight kind
// (elementwise.h): the weight of SAM's perturbation becomes a template parameter too.
template <typename F>
void with_sam_weight(int kind, const F& f) {
  switch (kind) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: throw std::invalid_argument("SAM weight kind must be 0 (plain), 1 (ASAM), 2 or 3 (Fisher-SAM)");
  }
}

}  // namespace cl_optim
