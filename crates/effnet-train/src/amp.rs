//! Mixed precision beyond what tch offers: autocast with bfloat16 (tch's `autocast` is CUDA-fp16
//! only, with no dtype choice) and the channels_last memory format, through a small C++ shim
//! (`csrc/amp.cpp`) compiled against the same libtorch.

use tch::{Device, Tensor};

use crate::error::{Error, Result};

unsafe extern "C" {
    fn effnet_autocast_set(device: i32, enabled: i32, bf16: i32) -> i32;
    fn effnet_autocast_is_bf16(device: i32) -> i32;
    fn effnet_channels_last(tensor: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    fn effnet_is_channels_last(tensor: *const torch_sys::C_tensor) -> i32;
    fn effnet_torch_version(major: *mut i32, minor: *mut i32, patch: *mut i32);
}

fn device_code(device: Device) -> i32 {
    if device.is_cuda() { 1 } else { 0 }
}

/// Leaves the autocast region when dropped, also on a panic.
struct AutocastGuard(i32);

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: plain C call; the shim catches every C++ exception.
        unsafe { effnet_autocast_set(self.0, 0, 1) };
    }
}

/// Run `f` with bfloat16 autocast on `device`: convolutions and matrix products compute in bf16,
/// precision-sensitive ops (softmax, losses, norms) stay in float32, as torch.autocast does.
pub fn autocast_bf16<T>(device: Device, f: impl FnOnce() -> T) -> Result<T> {
    let code = device_code(device);
    // SAFETY: plain C call; the shim catches every C++ exception.
    if unsafe { effnet_autocast_set(code, 1, 1) } != 0 {
        return Err(Error::Internal(format!("libtorch refused bf16 autocast on {device:?}")));
    }
    let _guard = AutocastGuard(code);
    Ok(f())
}

/// True inside [`autocast_bf16`] for `device`.
pub fn is_autocast_bf16(device: Device) -> bool {
    // SAFETY: plain C call; the shim catches every C++ exception.
    unsafe { effnet_autocast_is_bf16(device_code(device)) == 1 }
}

/// A channels_last (NHWC in memory) version of a 4-D tensor.
pub fn channels_last(tensor: &Tensor) -> Result<Tensor> {
    // SAFETY: `as_ptr` is a valid tensor for the call; the shim returns a new owned tensor
    // (or null), which `from_ptr` takes ownership of.
    let pointer = unsafe { effnet_channels_last(tensor.as_ptr()) };
    if pointer.is_null() {
        return Err(Error::Internal(format!("cannot make a {:?} tensor channels_last", tensor.size())));
    }
    Ok(unsafe { Tensor::from_ptr(pointer) })
}

pub fn is_channels_last(tensor: &Tensor) -> bool {
    // SAFETY: `as_ptr` is a valid tensor for the call.
    unsafe { effnet_is_channels_last(tensor.as_ptr()) == 1 }
}

/// Store every 4-D variable (convolution weights) of `vs` as channels_last, as PyTorch's
/// `model.to(memory_format=torch.channels_last)` does.
pub fn variables_to_channels_last(vs: &tch::nn::VarStore) -> Result<()> {
    for (_, mut variable) in vs.variables() {
        if variable.dim() == 4 {
            let converted = channels_last(&variable.detach())?;
            tch::no_grad(|| variable.set_data(&converted));
        }
    }
    Ok(())
}

/// The libtorch version, e.g. `2.11.0`.
pub fn torch_version() -> String {
    let (mut major, mut minor, mut patch) = (0, 0, 0);
    // SAFETY: the function writes three ints through valid pointers.
    unsafe { effnet_torch_version(&mut major, &mut minor, &mut patch) };
    format!("{major}.{minor}.{patch}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn cpu_autocast_computes_convolutions_in_bf16() {
        let _generator = crate::global_generator();
        let input = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let weight = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        assert!(!is_autocast_bf16(Device::Cpu));
        let (inside, convolved, loss) = autocast_bf16(Device::Cpu, || {
            let out = input.conv2d(&weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
            let target = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
            let logits = out.mean_dim([2, 3].as_slice(), false, None);
            (is_autocast_bf16(Device::Cpu), out, logits.cross_entropy_for_logits(&target))
        })
        .unwrap();
        assert!(inside);
        assert_eq!(convolved.kind(), Kind::BFloat16);
        assert_eq!(loss.kind(), Kind::Float, "losses stay in float32 under autocast");
        assert!(!is_autocast_bf16(Device::Cpu), "the region ends with the closure");
        let plain = input.conv2d(&weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(plain.kind(), Kind::Float);
        let difference = (plain - convolved.to_kind(Kind::Float)).abs().max().double_value(&[]);
        assert!(difference < 0.2, "bf16 result far from float32: {difference}");
    }

    #[test]
    fn channels_last_keeps_values() {
        let _generator = crate::global_generator();
        let tensor = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&tensor));
        let converted = channels_last(&tensor).unwrap();
        assert!(is_channels_last(&converted));
        assert!(converted.equal(&tensor));
        assert_eq!(converted.stride(), vec![60, 1, 15, 3]);
    }
}
