#include "op_args.h"

namespace mate {

OpArgs::OpArgs(const c10::OperatorHandle& op, torch::jit::Stack* stack)
    : schema_(op.schema()),
      stack_(stack),
      num_args_(schema_.arguments().size()),
      first_(stack->data() + (stack->size() - num_args_)),
      name_(schema_.name().c_str()) {}

const c10::IValue* OpArgs::find(std::string_view name) const {
  const auto& args = schema_.arguments();
  for (size_t k = 0; k < num_args_; ++k) {
    const size_t i = (hint_ + k) % num_args_;
    if (args[i].name() == name) {
      hint_ = i + 1;
      return first_ + i;
    }
  }
  return nullptr;
}

const at::Tensor& OpArgs::tensor(std::string_view name) const {
  const c10::IValue* v = find(name);
  TORCH_INTERNAL_ASSERT(v && v->isTensor(), name_, ": no Tensor argument named ", name);
  return v->toTensor();
}

std::optional<at::Tensor> OpArgs::opt_tensor(std::string_view name) const {
  const c10::IValue* v = find(name);
  if (!v || v->isNone()) return std::nullopt;
  return v->toTensor();
}

std::optional<int64_t> OpArgs::opt_integer(std::string_view name) const {
  const c10::IValue* v = find(name);
  if (!v || v->isNone()) return std::nullopt;
  if (v->isSymInt()) return v->toSymInt().guard_int(__FILE__, __LINE__);
  return v->toInt();
}

int64_t OpArgs::integer(std::string_view name, int64_t fallback) const {
  return opt_integer(name).value_or(fallback);
}

std::optional<double> OpArgs::opt_real(std::string_view name) const {
  const c10::IValue* v = find(name);
  if (!v || v->isNone()) return std::nullopt;
  return v->toDouble();
}

double OpArgs::real(std::string_view name, double fallback) const { return opt_real(name).value_or(fallback); }

std::optional<bool> OpArgs::opt_flag(std::string_view name) const {
  const c10::IValue* v = find(name);
  if (!v || v->isNone()) return std::nullopt;
  return v->toBool();
}

bool OpArgs::flag(std::string_view name, bool fallback) const { return opt_flag(name).value_or(fallback); }

std::optional<at::ScalarType> OpArgs::opt_dtype(std::string_view name) const {
  const c10::IValue* v = find(name);
  if (!v || v->isNone()) return std::nullopt;
  return v->toScalarType();
}

}  // namespace mate
