// What tch lacks for mixed precision: autocast with a chosen dtype (tch's `autocast` is CUDA-fp16
// only) and the channels_last memory format. Each function catches every C++ exception and
// returns a status, so nothing unwinds into Rust.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace {
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }
}  // namespace

extern "C" {

// Enter (enabled = 1) or leave (enabled = 0) an autocast region for the device (0 CPU, 1 CUDA)
// with bfloat16 (bf16 = 1) or float16. Returns 0 on success, -1 on a libtorch error.
int effnet_autocast_set(int device, int enabled, int bf16) {
  try {
    at::DeviceType type = device_type(device);
    if (enabled) {
      at::autocast::set_autocast_dtype(type, bf16 ? at::kBFloat16 : at::kHalf);
      at::autocast::set_autocast_enabled(type, true);
      at::autocast::increment_nesting();
    } else {
      if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
      }
      at::autocast::set_autocast_enabled(type, false);
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 when autocast is on for the device with bfloat16, 0 otherwise.
int effnet_autocast_is_bf16(int device) {
  try {
    at::DeviceType type = device_type(device);
    return at::autocast::is_autocast_enabled(type) && at::autocast::get_autocast_dtype(type) == at::kBFloat16;
  } catch (...) {
    return 0;
  }
}

// A channels_last copy of a 4-D tensor (the same tensor when it already is), or null on error.
at::Tensor* effnet_channels_last(const at::Tensor* tensor) {
  try {
    return new at::Tensor(tensor->contiguous(at::MemoryFormat::ChannelsLast));
  } catch (...) {
    return nullptr;
  }
}

int effnet_is_channels_last(const at::Tensor* tensor) {
  try {
    return tensor->dim() == 4 && tensor->is_contiguous(at::MemoryFormat::ChannelsLast);
  } catch (...) {
    return 0;
  }
}

// The libtorch version these headers belong to (the one linked: torch-sys checks it).
void effnet_torch_version(int* major, int* minor, int* patch) {
  *major = TORCH_VERSION_MAJOR;
  *minor = TORCH_VERSION_MINOR;
  *patch = TORCH_VERSION_PATCH;
}
}
