//! What tch lacks for training at scale, through the C++ shim `csrc/autograd.cpp`, behind a safe
//! API:
//! - [`cross_replica_sum`]: an autograd function whose forward and backward call a Rust closure
//!   (the sum across ranks SyncBatchNorm needs: the gradient of a sum over ranks is the sum over
//!   ranks of the gradients);
//! - [`checkpoint`]: activation checkpointing (PyTorch's reentrant `checkpoint`): a closure run
//!   without keeping its activations, rerun in backward with the same random draws and autocast;
//! - [`with_post_accumulate_hooks`]: a callback each time a parameter's gradient is complete
//!   during backward (PyTorch's `register_post_accumulate_grad_hook`), for the all-reduce
//!   overlapped with backward;
//! - [`cuda_memory`]: the CUDA caching allocator's current and peak bytes.
//!
//! Closures handed to libtorch are owned by the autograd graph (freed with it); a closure that
//! fails returns an error, which becomes a libtorch error of the forward call or of `backward`.
//! Panics are caught at the boundary and reported the same way.

use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use effnet_model::Pass;
use tch::Tensor;

use crate::error::{Error, Result};

type Call = unsafe extern "C" fn(
    *mut c_void,
    i32,
    *const torch_sys::C_tensor,
    *mut c_char,
    usize,
) -> *mut torch_sys::C_tensor;
type Drop = unsafe extern "C" fn(*mut c_void);
type Hook = unsafe extern "C" fn(*mut c_void, usize);

unsafe extern "C" {
    fn effnet_apply_closure(
        kind: i32,
        input: *const torch_sys::C_tensor,
        data: *mut c_void,
        call: Call,
        drop: Drop,
        error: *mut c_char,
        capacity: usize,
    ) -> *mut torch_sys::C_tensor;
    fn effnet_set_post_accumulate_hooks(
        tensors: *const *const torch_sys::C_tensor,
        count: usize,
        hook: Option<Hook>,
        data: *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> i32;
    fn effnet_cuda_memory(
        device: i32,
        allocated: *mut i64,
        allocated_peak: *mut i64,
        reserved: *mut i64,
        reserved_peak: *mut i64,
    ) -> i32;
    fn effnet_cuda_reset_peak(device: i32) -> i32;
}

/// Which run a closure is called in: 0 the forward (or, for a sum, its forward value), 1 the
/// backward (the gradient to sum, or the recomputation).
pub type Closure = Box<dyn Fn(Phase, &Tensor) -> Result<Tensor> + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
}

impl From<Phase> for Pass {
    fn from(phase: Phase) -> Pass {
        match phase {
            Phase::Forward => Pass::Forward,
            Phase::Backward => Pass::Recompute,
        }
    }
}

const ERROR_CAPACITY: usize = 1024;

fn write_message(error: *mut c_char, capacity: usize, message: &str) {
    if error.is_null() || capacity == 0 {
        return;
    }
    let bytes = message.as_bytes();
    let n = bytes.len().min(capacity - 1);
    // SAFETY: the shim passes a buffer of `capacity` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), error as *mut u8, n);
        *error.add(n) = 0;
    }
}

unsafe extern "C" fn call_closure(
    data: *mut c_void,
    phase: i32,
    input: *const torch_sys::C_tensor,
    error: *mut c_char,
    capacity: usize,
) -> *mut torch_sys::C_tensor {
    // SAFETY: `data` is the `Box<Closure>` leaked in `apply`, alive until `drop_closure`.
    let closure = unsafe { &*(data as *const Closure) };
    // SAFETY: the shim passes a valid tensor for the duration of the call; `from_ptr` of a fresh
    // handle (a shallow copy) leaves the caller's tensor alone.
    let input = unsafe { Tensor::from_ptr(torch_sys::at_shallow_clone(input as *mut _)) };
    let phase = if phase == 0 { Phase::Forward } else { Phase::Backward };
    match catch_unwind(AssertUnwindSafe(|| closure(phase, &input))) {
        Ok(Ok(output)) => {
            // SAFETY: hand a new owned handle to the shim, which deletes it.
            unsafe { torch_sys::at_shallow_clone(output.as_ptr() as *mut _) }
        }
        Ok(Err(e)) => {
            write_message(error, capacity, &e.to_string());
            std::ptr::null_mut()
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a Rust callback panicked".into());
            write_message(error, capacity, &text);
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn drop_closure(data: *mut c_void) {
    // SAFETY: `data` came from `Box::into_raw` in `apply` and is dropped exactly once.
    drop(unsafe { Box::from_raw(data as *mut Closure) });
}

fn read_error(buffer: &[c_char]) -> String {
    // SAFETY: the buffer is NUL-terminated (zeroed, and the shim writes at most capacity-1).
    unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned()
}

fn apply(kind: i32, input: &Tensor, closure: Closure) -> Result<Tensor> {
    let data = Box::into_raw(Box::new(closure)) as *mut c_void;
    let mut error = [0 as c_char; ERROR_CAPACITY];
    // SAFETY: `input` is valid for the call; ownership of `data` passes to the shim, which frees
    // it through `drop_closure` (also on failure).
    let out = unsafe {
        effnet_apply_closure(
            kind,
            input.as_ptr(),
            data,
            call_closure,
            drop_closure,
            error.as_mut_ptr(),
            ERROR_CAPACITY,
        )
    };
    if out.is_null() {
        return Err(Error::Internal(read_error(&error)));
    }
    // SAFETY: a new tensor owned by us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `sum(Phase::Forward, input)` with the gradient `sum(Phase::Backward, grad)`: for a `sum` that
/// adds the tensor over the data-parallel ranks, a differentiable all-reduce.
pub fn cross_replica_sum(input: &Tensor, sum: Closure) -> Result<Tensor> {
    apply(0, input, sum)
}

/// `block(Phase::Forward, input)` without keeping the activations inside it: backward reruns
/// `block(Phase::Backward, input)` under the forward's random-generator and autocast state and
/// backpropagates through the rerun. The input should require grad (a block after the stem
/// does), or the block's parameters get no gradient, as in PyTorch.
pub fn checkpoint(input: &Tensor, block: Closure) -> Result<Tensor> {
    apply(1, input, block)
}

unsafe extern "C" fn call_hook(data: *mut c_void, index: usize) {
    // SAFETY: `data` is the `&dyn Fn(usize) + Sync` passed to `with_post_accumulate_hooks`,
    // alive while the hooks are registered.
    let hook = unsafe { &*(data as *const &(dyn Fn(usize) + Sync)) };
    // A panic must not unwind into libtorch; the hook's owner sees a bucket never launched.
    let _ = catch_unwind(AssertUnwindSafe(|| hook(index)));
}

fn set_hooks(tensors: &[&Tensor], hook: Option<Hook>, data: *mut c_void) -> Result<()> {
    let pointers: Vec<*const torch_sys::C_tensor> = tensors.iter().map(|t| t.as_ptr()).collect();
    let mut error = [0 as c_char; ERROR_CAPACITY];
    // SAFETY: valid tensors for the call; the shim copies what it keeps.
    let code = unsafe {
        effnet_set_post_accumulate_hooks(
            pointers.as_ptr(),
            pointers.len(),
            hook,
            data,
            error.as_mut_ptr(),
            ERROR_CAPACITY,
        )
    };
    if code != 0 {
        return Err(Error::Internal(format!("post-accumulate-grad hooks: {}", read_error(&error))));
    }
    Ok(())
}

/// Removes the hooks when dropped, also on a panic.
struct HookGuard<'a>(&'a [&'a Tensor]);

impl std::ops::Drop for HookGuard<'_> {
    fn drop(&mut self) {
        let _ = set_hooks(self.0, None, std::ptr::null_mut());
    }
}

/// Run `f` (a backward pass) with `hook(i)` called each time the gradient of `parameters[i]`
/// has been accumulated. The hooks are removed when `f` returns. On CUDA libtorch calls hooks
/// from its device thread, hence `Sync`.
pub fn with_post_accumulate_hooks<T>(
    parameters: &[&Tensor],
    hook: &(dyn Fn(usize) + Sync),
    f: impl FnOnce() -> T,
) -> Result<T> {
    let mut hook_ref: &(dyn Fn(usize) + Sync) = hook;
    let data = &mut hook_ref as *mut &(dyn Fn(usize) + Sync) as *mut c_void;
    set_hooks(parameters, Some(call_hook), data)?;
    let _guard = HookGuard(parameters);
    Ok(f())
}

/// The CUDA caching allocator's bytes on one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CudaMemory {
    /// Held by tensors now.
    pub allocated: i64,
    /// Held by tensors at most since the last [`reset_cuda_peak`].
    pub allocated_peak: i64,
    /// Reserved from the driver now (allocated + cached).
    pub reserved: i64,
    pub reserved_peak: i64,
}

/// The allocator's statistics for CUDA device `device`, or `None` where libtorch has no CUDA
/// allocator (a CPU build or no GPU).
pub fn cuda_memory(device: i32) -> Option<CudaMemory> {
    let mut m = CudaMemory::default();
    // SAFETY: four valid out-pointers; the shim catches every C++ exception.
    let code = unsafe {
        effnet_cuda_memory(
            device,
            &mut m.allocated,
            &mut m.allocated_peak,
            &mut m.reserved,
            &mut m.reserved_peak,
        )
    };
    (code == 0).then_some(m)
}

/// Start a new peak for [`cuda_memory`]; false without a CUDA allocator.
pub fn reset_cuda_peak(device: i32) -> bool {
    // SAFETY: plain C call; the shim catches every C++ exception.
    unsafe { effnet_cuda_reset_peak(device) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tch::{Device, Kind};

    fn doubled(phase_log: std::sync::Arc<Mutex<Vec<Phase>>>) -> Closure {
        Box::new(move |phase, t| {
            phase_log.lock().unwrap().push(phase);
            Ok(t * 2.0)
        })
    }

    #[test]
    fn cross_replica_sum_calls_back_in_forward_and_backward() {
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).requires_grad_(true);
        let y = cross_replica_sum(&x, doubled(log.clone())).unwrap();
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), [2.0, 4.0, 6.0]);
        (&y * Tensor::from_slice(&[1.0f32, 10.0, 100.0])).sum(Kind::Float).backward();
        // The "sum over two identical ranks" doubles the gradient too.
        assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), [2.0, 20.0, 200.0]);
        assert_eq!(*log.lock().unwrap(), [Phase::Forward, Phase::Backward]);
    }

    #[test]
    fn closure_errors_surface_in_forward_and_backward() {
        let x = Tensor::from_slice(&[1.0f32]).requires_grad_(true);
        let failing: Closure = Box::new(|_, _| Err(Error::Collective("rank 1 is gone".into())));
        let error = cross_replica_sum(&x, failing).unwrap_err().to_string();
        assert!(error.contains("rank 1 is gone"), "{error}");
        let in_backward: Closure = Box::new(|phase, t| match phase {
            Phase::Forward => Ok(t.shallow_clone()),
            Phase::Backward => panic!("backward exploded"),
        });
        let y = cross_replica_sum(&x, in_backward).unwrap();
        let error = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(error.contains("backward exploded"), "{error}");
    }

    #[test]
    fn checkpoint_gives_the_plain_gradients_and_replays_random_draws() {
        let _generator = crate::global_generator();
        let weight = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let input = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let block = {
            let weight = weight.shallow_clone();
            move |x: &Tensor| {
                // Dropout draws from the global generator: the rerun must draw the same mask.
                x.matmul(&weight).tanh().dropout(0.5, true)
            }
        };
        tch::manual_seed(7);
        let plain = block(&input);
        (&plain * &plain).sum(Kind::Float).backward();
        let (plain_weight_grad, plain_input_grad) = (weight.grad().copy(), input.grad().copy());
        let _ = weight.grad().zero_();
        let _ = input.grad().zero_();

        tch::manual_seed(7);
        let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let checkpointed = checkpoint(
            &input,
            Box::new(move |phase, x| {
                log.lock().unwrap().push(phase);
                Ok(block(x))
            }),
        )
        .unwrap();
        assert!(checkpointed.equal(&plain));
        (&checkpointed * &checkpointed).sum(Kind::Float).backward();
        assert!(weight.grad().equal(&plain_weight_grad), "parameter gradient differs");
        assert!(input.grad().equal(&plain_input_grad), "input gradient differs");
        assert_eq!(*calls.lock().unwrap(), [Phase::Forward, Phase::Backward]);
    }

    #[test]
    fn checkpoint_reruns_under_the_forwards_autocast() {
        let _generator = crate::global_generator();
        let weight = Tensor::randn([8, 4, 3, 3], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let input = Tensor::randn([2, 4, 6, 6], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let conv = {
            let weight = weight.shallow_clone();
            move |x: &Tensor| x.conv2d(&weight, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
        };
        // Backward runs outside the autocast region; the rerun must be in bf16 all the same, or
        // its gradients would be float32 ones and differ from the plain bf16 run's.
        let plain = crate::amp::autocast_bf16(Device::Cpu, || conv(&input)).unwrap();
        assert_eq!(plain.kind(), Kind::BFloat16);
        plain.to_kind(Kind::Float).square().sum(Kind::Float).backward();
        let expected = weight.grad().copy();
        let _ = weight.grad().zero_();
        let checkpointed = crate::amp::autocast_bf16(Device::Cpu, || {
            checkpoint(&input, Box::new(move |_, x| Ok(conv(x)))).unwrap()
        })
        .unwrap();
        assert_eq!(checkpointed.kind(), Kind::BFloat16);
        checkpointed.to_kind(Kind::Float).square().sum(Kind::Float).backward();
        assert!(
            weight.grad().equal(&expected),
            "{:e}",
            (weight.grad() - expected).abs().max().double_value(&[])
        );
    }

    #[test]
    fn post_accumulate_hooks_fire_once_per_parameter_and_are_removed() {
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).requires_grad_(true);
        let seen = Mutex::new(Vec::new());
        let hook = |i: usize| seen.lock().unwrap().push(i);
        with_post_accumulate_hooks(&[&a, &b], &hook, || {
            (a.sum(Kind::Float) * 2.0 + b.sum(Kind::Float)).backward();
        })
        .unwrap();
        let mut order = seen.lock().unwrap().clone();
        order.sort();
        assert_eq!(order, [0, 1]);
        // Removed: a second backward calls nothing.
        (a.sum(Kind::Float) + b.sum(Kind::Float)).backward();
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), [3.0, 3.0]);
    }

    #[test]
    fn cpu_builds_report_no_cuda_allocator() {
        if tch::Cuda::is_available() {
            return;
        }
        assert_eq!(cuda_memory(0), None);
        assert!(!reset_cuda_peak(0));
    }
}
