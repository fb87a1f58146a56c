// Host-side argument checking and token-spec bookkeeping of the fused pool ops, shared by the
// CPU and CUDA implementations. Python validates first (fastfuse/gather.py); these checks make
// a direct torch.ops call fail with a message instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include <string>
#include <vector>

namespace fastfuse {

enum class TokenSpec { kCls, kAp, kClsAp, kAll };

inline TokenSpec parse_token_spec(const std::string& tokens) {
  if (tokens == "cls") return TokenSpec::kCls;
  if (tokens == "ap") return TokenSpec::kAp;
  if (tokens == "cls+ap") return TokenSpec::kClsAp;
  if (tokens == "all") return TokenSpec::kAll;
  TORCH_CHECK(false, "fastfuse: tokens must be one of 'cls', 'ap', 'cls+ap', 'all', got '",
              tokens, "'");
}

inline bool reads_cls(TokenSpec spec) {
  return spec == TokenSpec::kCls || spec == TokenSpec::kClsAp;
}
inline bool reads_average(TokenSpec spec) {
  return spec == TokenSpec::kAp || spec == TokenSpec::kClsAp;
}

// Where gathered token n comes from: one row of one layer, or (row == kAverageRow) the mean
// of rows num_prefix_tokens..T_l-1 of that layer.
struct TokenSource {
  static constexpr int64_t kAverageRow = -1;
  int64_t layer;
  int64_t row;
};

// What both ops know once their arguments are checked.
struct PoolProblem {
  TokenSpec spec;
  int64_t batch;
  int64_t dim;
  int64_t heads;
  int64_t num_prefix_tokens;
  std::vector<int64_t> lengths;       // T_l
  std::vector<TokenSource> sources;   // one per gathered token, in output order
  at::ScalarType layer_dtype;
  at::ScalarType compute_dtype;       // float64 for float64 layers, else float32

  int64_t num_tokens() const { return static_cast<int64_t>(sources.size()); }
};

inline at::ScalarType compute_dtype_for(at::ScalarType layer_dtype) {
  return layer_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_device(const at::Tensor& tensor, const char* name, c10::DeviceType device) {
  TORCH_CHECK(tensor.device().type() == device, "fastfuse: ", name, " must be a ",
              c10::DeviceTypeName(device), " tensor, got one on ", tensor.device());
}

inline void check_shape(const at::Tensor& tensor, const char* name, at::IntArrayRef expected,
                        const char* layout) {
  TORCH_CHECK(tensor.sizes().equals(expected), "fastfuse: ", name, " must have shape ", layout,
              " = ", expected, ", got ", tensor.sizes());
}

inline PoolProblem check_forward_args(at::TensorList layers, const at::Tensor& score_weight,
                                      const std::string& tokens, int64_t num_prefix_tokens,
                                      c10::DeviceType device) {
  PoolProblem problem;
  problem.spec = parse_token_spec(tokens);
  TORCH_CHECK(!layers.empty(), "fastfuse: layers is empty: expected at least one (B, T, D) tensor");
  const at::Tensor& first = layers[0];
  for (size_t i = 0; i < layers.size(); ++i) {
    const at::Tensor& layer = layers[i];
    const std::string name = "layers[" + std::to_string(i) + "]";
    check_device(layer, name.c_str(), device);
    TORCH_CHECK(layer.dim() == 3, "fastfuse: ", name, " must have shape (B, T, D), got ",
                layer.sizes());
    TORCH_CHECK(layer.scalar_type() == first.scalar_type(), "fastfuse: ", name, " has dtype ",
                layer.scalar_type(), " but layers[0] has ", first.scalar_type());
    TORCH_CHECK(layer.size(0) == first.size(0) && layer.size(2) == first.size(2), "fastfuse: ",
                name, " has shape ", layer.sizes(), " but layers[0] has ", first.sizes(),
                ": all layers must share B and D");
    TORCH_CHECK(layer.device() == first.device(), "fastfuse: ", name, " is on ", layer.device(),
                " but layers[0] is on ", first.device());
  }
  problem.layer_dtype = first.scalar_type();
  TORCH_CHECK(problem.layer_dtype == at::kFloat || problem.layer_dtype == at::kDouble ||
                  problem.layer_dtype == at::kHalf || problem.layer_dtype == at::kBFloat16,
              "fastfuse: layers must be float16, bfloat16, float32 or float64, got ",
              problem.layer_dtype);
  problem.compute_dtype = compute_dtype_for(problem.layer_dtype);
  problem.batch = first.size(0);
  problem.dim = first.size(2);
  TORCH_CHECK(problem.dim >= 1, "fastfuse: the feature size D of layers must be >= 1");

  check_device(score_weight, "score_weight", device);
  TORCH_CHECK(score_weight.dim() == 2 && score_weight.size(0) >= 1 &&
                  score_weight.size(1) == problem.dim,
              "fastfuse: score_weight must have shape (H, D) with H >= 1 and D = ", problem.dim,
              ", got ", score_weight.sizes());
  TORCH_CHECK(score_weight.scalar_type() == problem.compute_dtype, "fastfuse: score_weight must be ",
              problem.compute_dtype, " for ", problem.layer_dtype, " layers, got ",
              score_weight.scalar_type());
  TORCH_CHECK(score_weight.device() == first.device(), "fastfuse: score_weight is on ",
              score_weight.device(), " but the layers are on ", first.device());
  problem.heads = score_weight.size(0);

  TORCH_CHECK(num_prefix_tokens >= 0, "fastfuse: num_prefix_tokens must be >= 0, got ",
              num_prefix_tokens);
  problem.num_prefix_tokens = problem.spec == TokenSpec::kAll ? 0 : num_prefix_tokens;
  for (size_t l = 0; l < layers.size(); ++l) {
    const int64_t length = layers[l].size(1);
    problem.lengths.push_back(length);
    if (problem.spec == TokenSpec::kAll) {
      for (int64_t row = 0; row < length; ++row) problem.sources.push_back({int64_t(l), row});
      continue;
    }
    if (reads_cls(problem.spec)) {
      TORCH_CHECK(length >= 1, "fastfuse: layers[", l, "] has no tokens: token spec '", tokens,
                  "' needs a CLS token");
      problem.sources.push_back({int64_t(l), 0});
    }
    if (reads_average(problem.spec)) {
      TORCH_CHECK(num_prefix_tokens < length, "fastfuse: num_prefix_tokens=", num_prefix_tokens,
                  " must be smaller than the number of tokens of layers[", l, "] (", length,
                  "): token spec '", tokens, "' averages the tokens after the prefix");
      problem.sources.push_back({int64_t(l), TokenSource::kAverageRow});
    }
  }
  return problem;
}

inline PoolProblem check_backward_args(const at::Tensor& grad_pooled,
                                       const std::optional<at::Tensor>& grad_attention,
                                       at::TensorList layers, const at::Tensor& score_weight,
                                       const at::Tensor& pooled, const at::Tensor& attention,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::string& tokens, int64_t num_prefix_tokens,
                                       c10::DeviceType device) {
  PoolProblem problem = check_forward_args(layers, score_weight, tokens, num_prefix_tokens, device);
  const int64_t batch = problem.batch, heads = problem.heads, dim = problem.dim;
  const int64_t num_tokens = problem.num_tokens();
  struct Saved {
    const at::Tensor* tensor;
    const char* name;
    std::vector<int64_t> shape;
    const char* layout;
  };
  std::vector<Saved> saved = {
      {&grad_pooled, "grad_pooled", {batch, heads, dim}, "(B, H, D)"},
      {&pooled, "pooled", {batch, heads, dim}, "(B, H, D)"},
      {&attention, "attention", {batch, heads, num_tokens}, "(B, H, N)"},
      {&mean, "mean", {batch, num_tokens}, "(B, N)"},
      {&rstd, "rstd", {batch, num_tokens}, "(B, N)"},
  };
  if (grad_attention.has_value()) {
    saved.push_back({&*grad_attention, "grad_attention", {batch, heads, num_tokens}, "(B, H, N)"});
  }
  for (const Saved& item : saved) {
    check_device(*item.tensor, item.name, device);
    check_shape(*item.tensor, item.name, item.shape, item.layout);
    TORCH_CHECK(item.tensor->scalar_type() == problem.compute_dtype, "fastfuse: ", item.name,
                " must be ", problem.compute_dtype, " (the compute dtype of ", problem.layer_dtype,
                " layers), got ", item.tensor->scalar_type());
  }
  return problem;
}

// The forward's outputs (SPEC §3): pooled (B, H, D), attention (B, H, N), mean and rstd (B, N),
// contiguous, in the compute dtype, on the layers' device.
struct ForwardOutputs {
  at::Tensor pooled, attention, mean, rstd;
};

inline ForwardOutputs allocate_forward_outputs(const PoolProblem& problem, const at::Tensor& layer) {
  const auto options = layer.options().dtype(problem.compute_dtype);
  const int64_t batch = problem.batch, heads = problem.heads, num_tokens = problem.num_tokens();
  return {at::empty({batch, heads, problem.dim}, options),
          at::empty({batch, heads, num_tokens}, options), at::empty({batch, num_tokens}, options),
          at::empty({batch, num_tokens}, options)};
}

// The backward's outputs (SPEC §3): one contiguous gradient per layer in the layer's dtype
// (none at all for frozen features: layers_need_grad false), and dw (H, D) in the compute
// dtype, zero so that a batch of 0 gives 0.
struct BackwardOutputs {
  std::vector<at::Tensor> grad_layers;
  at::Tensor grad_weight;
};

inline BackwardOutputs allocate_backward_outputs(const PoolProblem& problem, at::TensorList layers,
                                                 const at::Tensor& score_weight,
                                                 bool layers_need_grad) {
  BackwardOutputs outputs;
  if (layers_need_grad) {
    for (const at::Tensor& layer : layers) {
      outputs.grad_layers.push_back(
          at::empty(layer.sizes(), layer.options().memory_format(at::MemoryFormat::Contiguous)));
    }
  }
  outputs.grad_weight = at::zeros({problem.heads, problem.dim}, score_weight.options());
  return outputs;
}

// The saved tensors and incoming gradients as the kernels read them: contiguous. They may be
// views (autograd hands out expanded zero-stride gradients) and are small, so views are
// copied; the layers never are (the kernels read them through their strides).
struct BackwardInputs {
  at::Tensor grad_pooled;
  std::optional<at::Tensor> grad_attention;
  at::Tensor pooled, attention, mean, rstd;
};

inline BackwardInputs contiguous_backward_inputs(const at::Tensor& grad_pooled,
                                                 const std::optional<at::Tensor>& grad_attention,
                                                 const at::Tensor& pooled, const at::Tensor& attention,
                                                 const at::Tensor& mean, const at::Tensor& rstd) {
  return {grad_pooled.contiguous(),
          grad_attention.has_value() ? std::optional<at::Tensor>(grad_attention->contiguous())
                                     : std::nullopt,
          pooled.contiguous(), attention.contiguous(), mean.contiguous(), rstd.contiguous()};
}

}  // namespace fastfuse
