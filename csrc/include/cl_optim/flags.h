// with_flags(f, b0, b1, ...) calls f(std::bool_constant<b0>{}, std::bool_constant<b1>{}, ...):
// runtime on/off switches of a fused op become template parameters, so each combination is its
// own branch-free loop or kernel (`if constexpr` inside). Shared by the CPU and CUDA launchers.
#pragma once

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

}  // namespace cl_optim
