// What tch lacks for training at scale, beside amp.cpp: autograd functions whose forward and
// backward call back into Rust (a sum across ranks for SyncBatchNorm, activation checkpointing),
// gradient post-accumulate hooks (backward overlapped with the all-reduce), and the CUDA caching
// allocator's statistics. Every entry point catches every C++ exception and returns a status, so
// nothing unwinds into Rust; Rust callbacks report failure by returning null with a message,
// which becomes a C++ exception inside libtorch (and so an error of `backward`).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A Rust closure: `call(data, phase, input, error, capacity)` returns a new tensor (owned by the
// caller) or null after writing a message into `error`; `drop(data)` frees it.
using Call = at::Tensor* (*)(void* data, int phase, const at::Tensor* input, char* error, size_t capacity);
using Drop = void (*)(void* data);

// Keeps a Rust closure alive as long as the autograd graph that may call it.
struct RustClosure : torch::CustomClassHolder {
  void* data;
  Call call_fn;
  Drop drop_fn;
  RustClosure(void* d, Call c, Drop dr) : data(d), call_fn(c), drop_fn(dr) {}
  ~RustClosure() override { drop_fn(data); }
  RustClosure(const RustClosure&) = delete;
  RustClosure& operator=(const RustClosure&) = delete;

  at::Tensor call(int phase, const at::Tensor& input) const {
    char error[1024] = {0};
    at::Tensor* out = call_fn(data, phase, &input, error, sizeof(error));
    if (out == nullptr) {
      throw std::runtime_error(error[0] ? std::string(error) : std::string("a Rust callback failed"));
    }
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

c10::intrusive_ptr<RustClosure> closure_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<RustClosure>(ctx->saved_data["closure"].toCapsule());
}

// Phases a closure is called in.
constexpr int kForward = 0;
constexpr int kBackward = 1;

// y = Σ_ranks x, and in backward dL/dx = Σ_ranks dL/dy: every rank's y feeds every rank's loss.
struct CrossReplicaSum : torch::autograd::Function<CrossReplicaSum> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::IValue closure) {
    ctx->saved_data["closure"] = closure;
    auto rust = closure_of(ctx);
    return rust->call(kForward, input.contiguous());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto rust = closure_of(ctx);
    return {rust->call(kBackward, grads[0].contiguous()), at::Tensor()};
  }
};

// Which autocast regions are on, to run a recomputation under the forward's.
struct AutocastState {
  bool cpu, cuda;
  at::ScalarType cpu_dtype, cuda_dtype;
  static AutocastState now() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

// The default generators' states (CPU, and CUDA when libtorch has it), to replay random draws.
struct RngState {
  at::Tensor cpu, cuda;
  at::Device device = at::Device(at::kCPU);
  static RngState now(const at::Device& device) {
    RngState state;
    at::Generator cpu_gen = at::globalContext().defaultGenerator(at::Device(at::kCPU));
    {
      std::lock_guard<std::mutex> lock(cpu_gen.mutex());
      state.cpu = cpu_gen.get_state();
    }
    if (device.is_cuda()) {
      state.device = device;
      at::Generator cuda_gen = at::globalContext().defaultGenerator(device);
      std::lock_guard<std::mutex> lock(cuda_gen.mutex());
      state.cuda = cuda_gen.get_state();
    }
    return state;
  }
  void apply() const {
    at::Generator cpu_gen = at::globalContext().defaultGenerator(at::Device(at::kCPU));
    {
      std::lock_guard<std::mutex> lock(cpu_gen.mutex());
      cpu_gen.set_state(cpu);
    }
    if (cuda.defined()) {
      at::Generator cuda_gen = at::globalContext().defaultGenerator(device);
      std::lock_guard<std::mutex> lock(cuda_gen.mutex());
      cuda_gen.set_state(cuda);
    }
  }
};

// Activation checkpointing (PyTorch's reentrant `checkpoint`): forward runs the closure without
// recording a graph and keeps only its input; backward reruns it with the forward's random state
// and autocast state (phase kBackward: the closure must not update running statistics again),
// backpropagates through the rerun (gradients of the closure's parameters accumulate there) and
// returns the input's gradient.
struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::IValue closure) {
    ctx->saved_data["closure"] = closure;
    auto rng = RngState::now(input.device());
    ctx->saved_data["rng_cpu"] = rng.cpu;
    if (input.is_cuda()) ctx->saved_data["rng_cuda"] = rng.cuda;
    auto autocast = AutocastState::now();
    ctx->saved_data["autocast"] = std::vector<int64_t>{autocast.cpu, autocast.cuda, static_cast<int64_t>(autocast.cpu_dtype),
                                                       static_cast<int64_t>(autocast.cuda_dtype)};
    ctx->save_for_backward({input});
    at::NoGradGuard no_grad;
    return closure_of(ctx)->call(kForward, input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor input = saved[0].detach();
    input.requires_grad_(saved[0].requires_grad());
    at::Device device = saved[0].device();
    RngState forward_rng{ctx->saved_data["rng_cpu"].toTensor(),
                         device.is_cuda() ? ctx->saved_data["rng_cuda"].toTensor() : at::Tensor(), device};
    auto flags = ctx->saved_data["autocast"].toIntVector();
    AutocastState forward_autocast{flags[0] != 0, flags[1] != 0, static_cast<at::ScalarType>(flags[2]),
                                   static_cast<at::ScalarType>(flags[3])};
    auto rust = closure_of(ctx);

    auto outer_rng = RngState::now(device);
    auto outer_autocast = AutocastState::now();
    at::Tensor output;
    try {
      forward_rng.apply();
      forward_autocast.apply();
      at::AutoGradMode grad(true);
      output = rust->call(kBackward, input);
    } catch (...) {
      outer_autocast.apply();
      outer_rng.apply();
      throw;
    }
    outer_autocast.apply();
    outer_rng.apply();
    torch::autograd::backward({output}, {grads[0]});
    return {input.requires_grad() ? input.grad() : at::Tensor(), at::Tensor()};
  }
};

// Calls a Rust function with the parameter's index each time its gradient has been accumulated.
struct IndexHook : torch::autograd::PostAccumulateGradHook {
  using Fn = void (*)(void* data, size_t index);
  Fn fn;
  void* data;
  size_t index;
  IndexHook(Fn f, void* d, size_t i) : fn(f), data(d), index(i) {}
  void operator()(const torch::autograd::Variable&) override { fn(data, index); }
};

void write_error(char* error, size_t capacity, const char* message) {
  if (capacity == 0) return;
  std::strncpy(error, message, capacity - 1);
  error[capacity - 1] = 0;
}

}  // namespace

extern "C" {

// Apply a two-phase Rust closure as an autograd function: kind 0 = CrossReplicaSum, 1 =
// Checkpoint. The closure is owned from here on (freed with the graph, or now on error).
at::Tensor* effnet_apply_closure(int kind, const at::Tensor* input, void* data, Call call, Drop drop, char* error,
                                 size_t capacity) {
  c10::intrusive_ptr<RustClosure> closure;
  try {
    closure = c10::make_intrusive<RustClosure>(data, call, drop);
  } catch (const std::exception& e) {
    drop(data);
    write_error(error, capacity, e.what());
    return nullptr;
  }
  try {
    at::IValue capsule = at::IValue::make_capsule(closure);
    closure.reset();
    at::Tensor out = kind == 0 ? CrossReplicaSum::apply(*input, capsule) : Checkpoint::apply(*input, capsule);
    return new at::Tensor(out);
  } catch (const c10::Error& e) {
    write_error(error, capacity, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(error, capacity, e.what());
  }
  return nullptr;
}

// Register `fn(data, i)` as the post-accumulate-grad hook of tensors[i] (replacing any), or
// clear them all with fn = null. Returns 0, or -1 with a message.
int effnet_set_post_accumulate_hooks(const at::Tensor* const* tensors, size_t count, IndexHook::Fn fn, void* data,
                                     char* error, size_t capacity) {
  try {
    for (size_t i = 0; i < count; ++i) {
      std::unique_ptr<torch::autograd::PostAccumulateGradHook> hook;
      if (fn != nullptr) hook = std::make_unique<IndexHook>(fn, data, i);
      torch::autograd::impl::set_post_acc_grad_hooks(*tensors[i], std::move(hook));
    }
    return 0;
  } catch (const c10::Error& e) {
    write_error(error, capacity, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(error, capacity, e.what());
  }
  return -1;
}

// Bytes held by tensors now and at peak, and reserved by the caching allocator now and at peak,
// on CUDA device `device`. Returns 0, or -1 when libtorch has no CUDA allocator (a CPU build).
int effnet_cuda_memory(int device, int64_t* allocated, int64_t* allocated_peak, int64_t* reserved,
                       int64_t* reserved_peak) {
  try {
    auto stats = c10::getDeviceAllocator(at::kCUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *allocated_peak = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
    *reserved_peak = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Start a new peak for effnet_cuda_memory. Returns 0, or -1 without a CUDA allocator.
int effnet_cuda_reset_peak(int device) {
  try {
    c10::getDeviceAllocator(at::kCUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
}
