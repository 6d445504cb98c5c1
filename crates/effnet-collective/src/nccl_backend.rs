//! NCCL through cudarc's raw bindings, on CUDA device buffers, one process per GPU.
//!
//! cudarc loads libcuda and libnccl at run time (so this compiles everywhere) and panics when
//! they are missing, so [`nccl_available`] checks first and every entry point returns a clear
//! error instead. cudarc looks the library up as `libnccl.so` (not the `libnccl.so.2` pip's
//! `nvidia-nccl` wheel ships): `scripts/bootstrap.sh` with `EFFNET_TORCH=cuda` links one into
//! `.venv/nccl`, which CUDA builds carry in their rpath.
//!
//! Collectives run on the backend's own non-blocking stream, ordered after the work queued so
//! far on the legacy default stream (where libtorch queues its kernels: the gradients being
//! reduced) by a CUDA event recorded there and waited on by the NCCL stream. So an all-reduce
//! runs beside the kernels libtorch queues after it (the rest of backward, when the trainer's
//! communication thread overlaps the two), instead of behind them. The host then polls the NCCL
//! stream with `cuStreamQuery` and the communicator with `ncclCommGetAsyncError` until the work
//! is done or the deadline passes; on a timeout or an asynchronous error the communicator is
//! aborted (`ncclCommAbort`), which unblocks the kernels, and the call returns an error naming
//! the collective and the rank. The caller reads the result only after the call returns, so no
//! event is needed on the way back. Each call makes the device's primary context current first,
//! so any thread may call (one at a time).

use std::cell::Cell;
use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cuda;
use cudarc::nccl::sys as nccl;

use crate::{
    Backend, Buffer, Collective, DType, DeviceBuffer, Error, ReduceOp, Result, WorldInfo, check_root,
};

/// Whether this machine can run NCCL: the NVIDIA driver (libcuda) and libnccl load, and there
/// is a CUDA device. The error says which part is missing.
pub fn nccl_available() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries.
    let (driver, library) = unsafe { (cuda::is_culib_present(), nccl::is_culib_present()) };
    if !driver {
        return Err("no NVIDIA driver on this machine (libcuda.so cannot be loaded)".into());
    }
    if !library {
        return Err("libnccl.so cannot be loaded: put the folder holding libnccl.so (a link to pip's nvidia/nccl/lib/libnccl.so.2 will do) on LD_LIBRARY_PATH".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("the CUDA driver does not initialise: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| format!("{e:?}"))?;
    if count == 0 {
        return Err("the CUDA driver sees no GPU".into());
    }
    Ok(())
}

pub struct Nccl {
    comm: nccl::ncclComm_t,
    /// The device's primary context (libtorch's), made current by every call.
    context: cuda::CUcontext,
    /// Where collectives run.
    stream: cuda::CUstream,
    /// Recorded on the legacy default stream before each collective; the NCCL stream waits on it.
    ready: cuda::CUevent,
    rank: usize,
    world: usize,
    device: i32,
    timeout: Duration,
    aborted: Cell<bool>,
}

// SAFETY: the communicator, stream and event are used by one thread at a time (`&mut` or the
// owner), and each call makes the context current on the calling thread.
unsafe impl Send for Nccl {}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: Backend::Nccl, reason: reason.into() }
}

fn nccl_dtype(dtype: DType) -> nccl::ncclDataType_t {
    match dtype {
        DType::F32 => nccl::ncclDataType_t::ncclFloat32,
        DType::F64 => nccl::ncclDataType_t::ncclFloat64,
        DType::Bf16 => nccl::ncclDataType_t::ncclBfloat16,
    }
}

fn describe(result: nccl::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string.
    unsafe {
        let text = nccl::ncclGetErrorString(result);
        if text.is_null() {
            format!("{result:?}")
        } else {
            std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned()
        }
    }
}

impl Nccl {
    /// Join the NCCL group of `info`: device `local_rank`, rank 0's unique id delivered by
    /// `rendezvous` (the TCP one at `MASTER_ADDR:MASTER_PORT`, or a coordinator's).
    pub fn init(
        info: &WorldInfo,
        rendezvous: &dyn crate::rendezvous::Rendezvous,
        timeout: Duration,
    ) -> Result<Nccl> {
        nccl_available().map_err(unavailable)?;
        let device = info.local_rank as i32;
        // SAFETY: driver calls after a successful cuInit; the device ordinal is checked first.
        let (context, stream, ready) = unsafe {
            let count =
                cudarc::driver::result::device::get_count().map_err(|e| unavailable(format!("{e:?}")))?;
            if device >= count {
                return Err(unavailable(format!("local rank {device} has no GPU: this node has {count}")));
            }
            let handle =
                cudarc::driver::result::device::get(device).map_err(|e| unavailable(format!("{e:?}")))?;
            // The primary context is the one libtorch's runtime API uses.
            let context = cudarc::driver::result::primary_ctx::retain(handle)
                .map_err(|e| unavailable(format!("{e:?}")))?;
            cudarc::driver::result::ctx::set_current(context).map_err(|e| unavailable(format!("{e:?}")))?;
            let mut stream: cuda::CUstream = std::ptr::null_mut();
            let code = cuda::cuStreamCreate(&mut stream, cuda::CUstream_flags::CU_STREAM_NON_BLOCKING as u32);
            if code != cuda::CUresult::CUDA_SUCCESS {
                return Err(unavailable(format!("cannot create the NCCL stream: {code:?}")));
            }
            let mut ready: cuda::CUevent = std::ptr::null_mut();
            let code = cuda::cuEventCreate(&mut ready, cuda::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32);
            if code != cuda::CUresult::CUDA_SUCCESS {
                cuda::cuStreamDestroy_v2(stream);
                return Err(unavailable(format!("cannot create a CUDA event: {code:?}")));
            }
            (context, stream, ready)
        };
        let id = if info.rank == 0 {
            let id = cudarc::nccl::result::get_uniqueid().map_err(|e| unavailable(describe(e.0)))?;
            Some(id.internal.iter().map(|&b| b as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let bytes = rendezvous.share(info.rank, info.world_size, id.as_deref(), timeout)?;
        let address = rendezvous.address();
        let mut unique = nccl::ncclUniqueId { internal: [0; 128] };
        if bytes.len() != unique.internal.len() {
            return Err(Error::Rendezvous {
                address,
                reason: format!("expected a 128-byte NCCL id, got {} bytes", bytes.len()),
            });
        }
        for (slot, byte) in unique.internal.iter_mut().zip(&bytes) {
            *slot = *byte as _;
        }
        let mut comm = std::mem::MaybeUninit::<nccl::ncclComm_t>::uninit();
        // SAFETY: every rank passes the same id and world size and its own rank.
        unsafe {
            cudarc::nccl::result::comm_init_rank(
                comm.as_mut_ptr(),
                info.world_size as i32,
                unique,
                info.rank as i32,
            )
            .map_err(|e| Error::Failed {
                op: "init",
                rank: info.rank,
                backend: Backend::Nccl,
                reason: describe(e.0),
            })?;
        }
        Ok(Nccl {
            // SAFETY: initialised by ncclCommInitRank.
            comm: unsafe { comm.assume_init() },
            context,
            stream,
            ready,
            rank: info.rank,
            world: info.world_size,
            device,
            timeout,
            aborted: Cell::new(false),
        })
    }

    /// NCCL's version as an integer (e.g. 22703 for 2.27.3).
    pub fn version() -> Result<i32> {
        nccl_available().map_err(unavailable)?;
        cudarc::nccl::result::get_nccl_version().map_err(|e| unavailable(describe(e.0)))
    }

    fn device_buffer(&self, buffer: Buffer<'_>, op: &'static str) -> Result<DeviceBuffer> {
        match buffer {
            Buffer::Device(device) if device.device == self.device => Ok(device),
            Buffer::Device(device) => Err(Error::Invalid {
                what: op.to_string(),
                reason: format!("buffer on cuda:{} but this rank drives cuda:{}", device.device, self.device),
            }),
            Buffer::Host(_) => Err(Error::Invalid {
                what: op.to_string(),
                reason: "the NCCL backend reduces CUDA memory; got a host buffer".into(),
            }),
        }
    }

    fn check_usable(&self, op: &'static str) -> Result<()> {
        if self.aborted.get() {
            return Err(Error::Failed {
                op,
                rank: self.rank,
                backend: Backend::Nccl,
                reason: "the communicator was aborted after an earlier error".into(),
            });
        }
        Ok(())
    }

    fn abort_comm(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: the communicator is valid and aborted once.
            unsafe {
                let _ = cudarc::nccl::result::comm_abort(self.comm);
            }
        }
    }

    /// Make the context current on this thread and order the NCCL stream after everything queued
    /// so far on the legacy default stream.
    fn prepare(&self, op: &'static str) -> Result<()> {
        // SAFETY: the context, stream and event are valid until drop.
        let code = unsafe {
            let mut code = cuda::cuCtxSetCurrent(self.context);
            if code == cuda::CUresult::CUDA_SUCCESS {
                code = cuda::cuEventRecord(self.ready, std::ptr::null_mut());
            }
            if code == cuda::CUresult::CUDA_SUCCESS {
                code = cuda::cuStreamWaitEvent(self.stream, self.ready, 0);
            }
            code
        };
        if code != cuda::CUresult::CUDA_SUCCESS {
            return Err(Error::Failed {
                op,
                rank: self.rank,
                backend: Backend::Nccl,
                reason: format!("ordering the NCCL stream after libtorch's: {code:?}"),
            });
        }
        Ok(())
    }

    /// Wait for the work queued on the NCCL stream, watching the communicator.
    fn wait(&self, op: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: querying the backend's stream.
            let status = unsafe { cuda::cuStreamQuery(self.stream) };
            match status {
                cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    self.abort_comm();
                    return Err(Error::Failed {
                        op,
                        rank: self.rank,
                        backend: Backend::Nccl,
                        reason: format!("CUDA stream error {other:?}"),
                    });
                }
            }
            let mut async_error = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator.
            unsafe {
                nccl::ncclCommGetAsyncError(self.comm, &mut async_error);
            }
            if async_error != nccl::ncclResult_t::ncclSuccess
                && async_error != nccl::ncclResult_t::ncclInProgress
            {
                self.abort_comm();
                return Err(Error::Failed {
                    op,
                    rank: self.rank,
                    backend: Backend::Nccl,
                    reason: describe(async_error),
                });
            }
            if Instant::now() >= deadline {
                self.abort_comm();
                return Err(Error::Timeout {
                    op,
                    rank: self.rank,
                    world: self.world,
                    backend: Backend::Nccl,
                    after: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn launched(
        &self,
        op: &'static str,
        result: std::result::Result<cudarc::nccl::result::NcclStatus, cudarc::nccl::result::NcclError>,
    ) -> Result<()> {
        result.map_err(|e| {
            self.abort_comm();
            Error::Failed { op, rank: self.rank, backend: Backend::Nccl, reason: describe(e.0) }
        })?;
        self.wait(op)
    }
}

impl Collective for Nccl {
    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn cuda_device(&self) -> Option<i32> {
        Some(self.device)
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce(&self, buffer: Buffer<'_>, op: ReduceOp) -> Result<()> {
        const NAME: &str = "all_reduce";
        self.check_usable(NAME)?;
        let buffer = self.device_buffer(buffer, NAME)?;
        let reduce = match op {
            ReduceOp::Sum => nccl::ncclRedOp_t::ncclSum,
            ReduceOp::Average => nccl::ncclRedOp_t::ncclAvg,
        };
        let ptr = buffer.ptr as *mut c_void;
        self.prepare(NAME)?;
        // SAFETY: in place on the caller's device buffer, on the backend's stream (ordered after
        // the kernels that wrote the buffer).
        let result = unsafe {
            cudarc::nccl::result::all_reduce(
                ptr,
                ptr,
                buffer.len,
                nccl_dtype(buffer.dtype),
                reduce,
                self.comm,
                self.stream as _,
            )
        };
        self.launched(NAME, result)
    }

    fn broadcast(&self, buffer: Buffer<'_>, root: usize) -> Result<()> {
        const NAME: &str = "broadcast";
        self.check_usable(NAME)?;
        check_root(root, self.world, NAME)?;
        let buffer = self.device_buffer(buffer, NAME)?;
        let ptr = buffer.ptr as *mut c_void;
        self.prepare(NAME)?;
        // SAFETY: as in all_reduce.
        let result = unsafe {
            cudarc::nccl::result::broadcast(
                ptr,
                ptr,
                buffer.len,
                nccl_dtype(buffer.dtype),
                root as i32,
                self.comm,
                self.stream as _,
            )
        };
        self.launched(NAME, result)
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one float in a scratch allocation is one.
        const NAME: &str = "barrier";
        self.check_usable(NAME)?;
        let mut scratch: cuda::CUdeviceptr = 0;
        // SAFETY: a 4-byte allocation freed below, in this backend's context.
        unsafe {
            cuda::cuCtxSetCurrent(self.context);
            cuda::cuMemAlloc_v2(&mut scratch, 4);
            cuda::cuMemsetD32_v2(scratch, 0, 1);
        }
        let result = self.all_reduce(
            Buffer::Device(DeviceBuffer { ptr: scratch, len: 1, dtype: DType::F32, device: self.device }),
            ReduceOp::Sum,
        );
        // SAFETY: allocated above.
        unsafe {
            cuda::cuMemFree_v2(scratch);
        }
        result
    }

    fn abort(&self, _code: i32) {
        self.abort_comm();
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.aborted.get() {
            // SAFETY: the communicator is valid and destroyed once.
            unsafe {
                let _ = cudarc::nccl::result::comm_destroy(self.comm);
            }
        }
        // SAFETY: created in init, destroyed once, after the communicator.
        unsafe {
            cuda::cuCtxSetCurrent(self.context);
            cuda::cuEventDestroy_v2(self.ready);
            cuda::cuStreamDestroy_v2(self.stream);
        }
    }
}
