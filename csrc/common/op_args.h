// Named access to the arguments of a boxed op call.
//
// Every op body is registered as a boxed kernel and reads its arguments by the names
// its schema (csrc/registration.cpp) gives them. So an op's argument list is written
// once, in its schema; checking code shared by several ops (e.g. the FMHA checks used by
// fmha_fwd, fmha_fwd_out and fmha_fwd_kvcache) reads the names it needs, and a name an
// op's schema lacks reads as "not given" (None / the documented default).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <string_view>

namespace mate {

class OpArgs {
 public:
  OpArgs(const c10::OperatorHandle& op, torch::jit::Stack* stack);

  // A required Tensor argument.
  const at::Tensor& tensor(std::string_view name) const;
  // An optional Tensor argument: nullopt when None or when the schema has no such argument.
  std::optional<at::Tensor> opt_tensor(std::string_view name) const;
  // Scalars; `fallback` when the argument is None or absent from the schema.
  int64_t integer(std::string_view name, int64_t fallback) const;
  std::optional<int64_t> opt_integer(std::string_view name) const;  // SymInt? / int?
  double real(std::string_view name, double fallback) const;
  std::optional<double> opt_real(std::string_view name) const;
  bool flag(std::string_view name, bool fallback) const;
  std::optional<bool> opt_flag(std::string_view name) const;
  std::optional<at::ScalarType> opt_dtype(std::string_view name) const;

  const char* op_name() const { return name_; }

  // Replaces the arguments on the stack by the op's returns.
  template <typename... T>
  void set_returns(T&&... values) const {
    torch::jit::drop(*stack_, num_args_);
    torch::jit::push(*stack_, std::forward<T>(values)...);
  }

 private:
  // The argument called `name`, or nullptr when the schema has none.
  const c10::IValue* find(std::string_view name) const;

  const c10::FunctionSchema& schema_;
  torch::jit::Stack* stack_;
  size_t num_args_;
  const c10::IValue* first_;
  const char* name_;
  mutable size_t hint_ = 0;  // arguments are mostly read in schema order: start there
};

}  // namespace mate
