//! Open MPI on host buffers.
//!
//! Every collective is started non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`, `MPI_Ibarrier`) and
//! polled with `MPI_Test` until it completes or the deadline passes, so a dead peer becomes a
//! [`Error::Timeout`] instead of a hang. Errors are returned (`MPI_ERRORS_RETURN`), not fatal.
//!
//! After any error the communicator is *poisoned*: an unfinished collective may still own the
//! buffer, so no further MPI call is made except `MPI_Abort`, which ends every rank of the job.
//! Dropping a poisoned `Mpi` aborts rather than finalises (`MPI_Finalize` would wait for the dead
//! peer forever).

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::traits::{AsRaw, Communicator};

use crate::{Backend, Buffer, Collective, DType, Error, HostBuffer, ReduceOp, Result, check_root};

/// Elements per MPI call: counts are C ints, so larger buffers go in chunks.
const MAX_CHUNK: usize = 1 << 30;

pub struct Mpi {
    universe: Option<mpi::environment::Universe>,
    comm: ffi::MPI_Comm,
    rank: usize,
    world: usize,
    timeout: Duration,
    bf16_sum: ffi::MPI_Op,
    poisoned: Cell<bool>,
}

// SAFETY: the communicator handle is only used from the thread that owns the `Mpi` (the trait
// takes `&self` from one training thread; MPI is initialised with MPI_THREAD_FUNNELED).
unsafe impl Send for Mpi {}

/// `inoutvec[i] = invec[i] + inoutvec[i]` on bfloat16 bits, added in f32.
unsafe extern "C" fn bf16_sum(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _: *mut ffi::MPI_Datatype,
) {
    // SAFETY: MPI passes two arrays of `*len` elements of the datatype the op was called with,
    // which is always MPI_UINT16_T holding bf16 bits.
    unsafe {
        let n = *len as usize;
        let input = std::slice::from_raw_parts(invec as *const u16, n);
        let inout = std::slice::from_raw_parts_mut(inoutvec as *mut u16, n);
        for (acc, x) in inout.iter_mut().zip(input) {
            let sum = half::bf16::from_bits(*acc).to_f32() + half::bf16::from_bits(*x).to_f32();
            *acc = half::bf16::from_f32(sum).to_bits();
        }
    }
}

fn error_string(code: c_int) -> String {
    let mut buffer = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING bytes, as MPI_Error_string requires.
    let status = unsafe { ffi::MPI_Error_string(code, buffer.as_mut_ptr() as *mut _, &mut len) };
    if status != ffi::MPI_SUCCESS as c_int {
        return format!("MPI error {code}");
    }
    buffer.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&buffer).into_owned()
}

impl Mpi {
    /// Initialise MPI (once per process) on `MPI_COMM_WORLD`. Under `mpirun` the world is the
    /// launched ranks; a process started on its own is a world of one.
    pub fn init(timeout: Duration) -> Result<Mpi> {
        let unavailable = |reason: String| Error::Unavailable { backend: Backend::Mpi, reason };
        // Serialized: the trainer's communication thread makes the calls during a step (while
        // the main thread computes and makes none), the main thread between steps.
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| unavailable("MPI was already initialised in this process".into()))?;
        if matches!(threading, mpi::Threading::Single | mpi::Threading::Funneled) {
            return Err(unavailable(format!(
                "this MPI library offers thread level {threading:?}; the trainer needs Serialized"
            )));
        }
        let world = universe.world();
        let comm = world.as_raw();
        // SAFETY: MPI_Op is a plain handle; MPI_Op_create overwrites it.
        let mut op: ffi::MPI_Op = unsafe { std::mem::zeroed() };
        // SAFETY: plain MPI calls on the world communicator of an initialised MPI.
        unsafe {
            let code = ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN);
            if code != ffi::MPI_SUCCESS as c_int {
                return Err(unavailable(format!("cannot set MPI_ERRORS_RETURN: {}", error_string(code))));
            }
            let code = ffi::MPI_Op_create(Some(bf16_sum), 1, &mut op);
            if code != ffi::MPI_SUCCESS as c_int {
                return Err(unavailable(format!("cannot create the bf16 sum: {}", error_string(code))));
            }
        }
        Ok(Mpi {
            rank: world.rank() as usize,
            world: world.size() as usize,
            comm,
            universe: Some(universe),
            timeout,
            bf16_sum: op,
            poisoned: Cell::new(false),
        })
    }

    /// The processor (host) name, for logs.
    pub fn processor_name(&self) -> String {
        mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into())
    }

    /// The Open MPI library version string.
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|_| "unknown".into()).trim().to_string()
    }

    fn fail(&self, op: &'static str, code: c_int) -> Error {
        self.poisoned.set(true);
        Error::Failed { op, rank: self.rank, backend: Backend::Mpi, reason: error_string(code) }
    }

    fn check_usable(&self, op: &'static str) -> Result<()> {
        if self.poisoned.get() {
            return Err(Error::Failed {
                op,
                rank: self.rank,
                backend: Backend::Mpi,
                reason: "an earlier collective failed; the group must be aborted".into(),
            });
        }
        Ok(())
    }

    /// Poll `request` until it completes or the deadline passes.
    fn wait(&self, op: &'static str, request: &mut ffi::MPI_Request, deadline: Instant) -> Result<()> {
        let mut polls = 0u32;
        loop {
            let mut flag: c_int = 0;
            let mut status = MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: `request` is an active request started by this rank.
            let code = unsafe { ffi::MPI_Test(request, &mut flag, status.as_mut_ptr()) };
            if code != ffi::MPI_SUCCESS as c_int {
                return Err(self.fail(op, code));
            }
            if flag != 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.poisoned.set(true);
                return Err(Error::Timeout {
                    op,
                    rank: self.rank,
                    world: self.world,
                    backend: Backend::Mpi,
                    after: self.timeout,
                });
            }
            // Spin briefly (latency of small collectives), then back off so a waiting rank does
            // not take a core from the compute threads.
            polls += 1;
            if polls < 2_000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn host<'a>(&self, buffer: Buffer<'a>, op: &'static str) -> Result<HostBuffer<'a>> {
        match buffer {
            Buffer::Host(host) => Ok(host),
            Buffer::Device(_) => Err(Error::Invalid {
                what: op.to_string(),
                reason: "the MPI backend reduces host memory; got a CUDA buffer".into(),
            }),
        }
    }
}

/// (pointer, elements, MPI datatype) of a host buffer.
fn raw_parts(buffer: &mut HostBuffer<'_>) -> (*mut c_void, usize, DType, ffi::MPI_Datatype) {
    // SAFETY: reading the predefined datatype handles.
    unsafe {
        match buffer {
            HostBuffer::F32(b) => (b.as_mut_ptr() as *mut c_void, b.len(), DType::F32, ffi::RSMPI_FLOAT),
            HostBuffer::F64(b) => (b.as_mut_ptr() as *mut c_void, b.len(), DType::F64, ffi::RSMPI_DOUBLE),
            HostBuffer::Bf16(b) => (b.as_mut_ptr() as *mut c_void, b.len(), DType::Bf16, ffi::RSMPI_UINT16_T),
        }
    }
}

impl Collective for Mpi {
    fn backend(&self) -> Backend {
        Backend::Mpi
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn cuda_device(&self) -> Option<i32> {
        None
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce(&self, buffer: Buffer<'_>, op: ReduceOp) -> Result<()> {
        const NAME: &str = "all_reduce";
        self.check_usable(NAME)?;
        let mut host = self.host(buffer, NAME)?;
        let (ptr, len, dtype, datatype) = raw_parts(&mut host);
        // SAFETY: reading predefined handles.
        let sum = if dtype == DType::Bf16 { self.bf16_sum } else { unsafe { ffi::RSMPI_SUM } };
        let deadline = Instant::now() + self.timeout;
        let mut offset = 0;
        while offset < len {
            let count = (len - offset).min(MAX_CHUNK);
            let bytes = count * dtype.size();
            // rsmpi has no MPI_IN_PLACE: reduce from a copy into the caller's buffer.
            // SAFETY: `ptr` holds `len` elements; the chunk lies inside it.
            let send: Vec<u8> = unsafe {
                std::slice::from_raw_parts((ptr as *const u8).add(offset * dtype.size()), bytes).to_vec()
            };
            let mut request = MaybeUninit::<ffi::MPI_Request>::uninit();
            // SAFETY: `send` and the chunk of the caller's buffer stay alive until the request
            // completes; on a timeout `send` is leaked and the group poisoned (see the module doc).
            let code = unsafe {
                ffi::MPI_Iallreduce(
                    send.as_ptr() as *const c_void,
                    (ptr as *mut u8).add(offset * dtype.size()) as *mut c_void,
                    count as c_int,
                    datatype,
                    sum,
                    self.comm,
                    request.as_mut_ptr(),
                )
            };
            if code != ffi::MPI_SUCCESS as c_int {
                return Err(self.fail(NAME, code));
            }
            // SAFETY: MPI_Iallreduce succeeded, so the request is initialised.
            let mut request = unsafe { request.assume_init() };
            if let Err(error) = self.wait(NAME, &mut request, deadline) {
                std::mem::forget(send);
                return Err(error);
            }
            offset += count;
        }
        if op == ReduceOp::Average && self.world > 1 {
            host.scale_down(self.world);
        }
        Ok(())
    }

    fn broadcast(&self, buffer: Buffer<'_>, root: usize) -> Result<()> {
        const NAME: &str = "broadcast";
        self.check_usable(NAME)?;
        check_root(root, self.world, NAME)?;
        let mut host = self.host(buffer, NAME)?;
        let (ptr, len, dtype, datatype) = raw_parts(&mut host);
        let deadline = Instant::now() + self.timeout;
        let mut offset = 0;
        while offset < len {
            let count = (len - offset).min(MAX_CHUNK);
            let mut request = MaybeUninit::<ffi::MPI_Request>::uninit();
            // SAFETY: as in all_reduce.
            let code = unsafe {
                ffi::MPI_Ibcast(
                    (ptr as *mut u8).add(offset * dtype.size()) as *mut c_void,
                    count as c_int,
                    datatype,
                    root as c_int,
                    self.comm,
                    request.as_mut_ptr(),
                )
            };
            if code != ffi::MPI_SUCCESS as c_int {
                return Err(self.fail(NAME, code));
            }
            // SAFETY: MPI_Ibcast succeeded.
            let mut request = unsafe { request.assume_init() };
            self.wait(NAME, &mut request, deadline)?;
            offset += count;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        const NAME: &str = "barrier";
        self.check_usable(NAME)?;
        let mut request = MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: a barrier on the world communicator.
        let code = unsafe { ffi::MPI_Ibarrier(self.comm, request.as_mut_ptr()) };
        if code != ffi::MPI_SUCCESS as c_int {
            return Err(self.fail(NAME, code));
        }
        // SAFETY: MPI_Ibarrier succeeded.
        let mut request = unsafe { request.assume_init() };
        self.wait(NAME, &mut request, Instant::now() + self.timeout)
    }

    fn abort(&self, code: i32) {
        // SAFETY: MPI_Abort on the world communicator; it does not return under Open MPI.
        unsafe {
            ffi::MPI_Abort(self.comm, code);
        }
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        if self.poisoned.get() {
            // MPI_Finalize would wait for the failed peer; end the whole job instead.
            self.abort(3);
        }
        // SAFETY: the op was created by MPI_Op_create and MPI is still initialised.
        unsafe {
            ffi::MPI_Op_free(&mut self.bf16_sum);
        }
        // Finalises MPI.
        drop(self.universe.take());
    }
}
