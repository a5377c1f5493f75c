// Autograd for the forward-only functional ops, in C++ so that an eager call pays nothing for
// it when no input requires grad. When an input requires grad, the outputs get a graph node
// whose backward raises NotImplementedError naming the reason (instead of PyTorch's fallback,
// which would leave gradients silently None). fmha_fwd has a real backward (fmha_bwd), whose
// autograd formula is registered in Python (mate_ops/_autograd.py, torch.library.register_autograd,
// so that torch.compile and torch.export see it); a C++ Autograd kernel here would conflict with it.
#include <torch/csrc/autograd/function.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "op_bodies.h"

namespace mate {
namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;

// Why each op stays forward-only (the text of its backward's error).
const char* forward_only_reason(const std::string& op) {
  if (op == "mate::fmha_fwd_kvcache")
    return "the kv-cache decode step (in-place cache append, paged K/V caches) is an inference path";
  if (op == "mate::fmha_combine") return "the split-KV combine has no backward (fmha_fwd merges its splits inside)";
  if (op == "mate::rotary_embedding") return "the rotary embedding of the decode step is an inference path";
  if (op == "mate::mla_decode" || op == "mate::mla_sparse_prefill")
    return "MLA decode / sparse prefill (paged, possibly FP8 caches) are inference paths";
  return "its backward is not implemented";
}

struct ForwardOnlyBackward : Node {
  explicit ForwardOnlyBackward(std::string op) : op_(std::move(op)) {}
  variable_list apply(variable_list&&) override {
    TORCH_CHECK_NOT_IMPLEMENTED(false, op_, " is forward-only: ", forward_only_reason(op_),
                                " (run it under torch.no_grad() or torch.inference_mode())");
  }
  std::string name() const override { return "ForwardOnlyBackward"; }
  std::string op_;
};

// Graph nodes are held by std::shared_ptr up to torch 2.12 and by c10::intrusive_ptr after.
using NodePtr = decltype(torch::autograd::Edge{}.function);
template <typename N>
NodePtr make_node(std::string op) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N(std::move(op)));
  } else {
    return c10::make_intrusive<N>(std::move(op));
  }
}

void forward_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  variable_list inputs;
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& v : torch::jit::last(*stack, num_args))
      if (v.isTensor() && v.toTensor().requires_grad()) inputs.push_back(v.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (inputs.empty()) return;
  NodePtr node = make_node<ForwardOnlyBackward>(op.schema().name());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  const size_t num_returns = op.schema().returns().size();
  for (const c10::IValue& v : torch::jit::last(*stack, num_returns)) {
    if (!v.isTensor()) continue;
    at::Tensor out = v.toTensor();
    if (at::isFloatingType(out.scalar_type()) && !at::isFloat8Type(out.scalar_type()))
      torch::autograd::create_gradient_edge(out, node);
  }
}

}  // namespace

void register_forward_only_autograd(torch::Library& m) {
  for (const char* op : {"fmha_fwd_kvcache", "fmha_combine", "rotary_embedding", "mla_decode",
                         "mla_sparse_prefill"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&forward_only>());
}

}  // namespace mate
