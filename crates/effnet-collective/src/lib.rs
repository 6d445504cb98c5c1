//! Collectives for data-parallel training.
//!
//! [`Collective`] is the small surface the trainer needs: rank, world size, all-reduce (sum or
//! average), broadcast, barrier and abort, over flat buffers. Two real engines implement it:
//!
//! - [`Mpi`]: Open MPI, host buffers (CPU training, tests, machines without GPUs). Ranks come
//!   from `mpirun`.
//! - [`Nccl`]: NCCL through cudarc, CUDA device buffers, one process per GPU. Rank and world size
//!   come from the launcher's environment ([`WorldInfo::from_env`]); rank 0's unique id travels
//!   to the others through a [`rendezvous`].
//!
//! Every collective runs under a deadline. One that does not complete in time fails with an
//! error naming the collective, the rank and the backend, so a dead peer turns into a restart
//! rather than a hang. The conformance suite in [`conformance`] runs against any backend.
//!
//! This crate does not link libtorch: buffers are slices or device pointers, and the trainer
//! maps tensors onto them.

use std::fmt;
use std::time::Duration;

pub mod conformance;
mod env;
mod mpi_backend;
mod nccl_backend;
pub mod rendezvous;

pub use env::WorldInfo;
pub use mpi_backend::Mpi;
pub use nccl_backend::{Nccl, nccl_available};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} timed out after {after:?} on rank {rank} of {world} ({backend}): a peer is dead or stuck")]
    Timeout { op: &'static str, rank: usize, world: usize, backend: Backend, after: Duration },
    #[error("{op} failed on rank {rank} ({backend}): {reason}")]
    Failed { op: &'static str, rank: usize, backend: Backend, reason: String },
    #[error("{backend} is not available: {reason}")]
    Unavailable { backend: Backend, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("rendezvous at {address}: {reason}")]
    Rendezvous { address: String, reason: String },
}

/// Which engine a [`Collective`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Mpi,
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size.
    Average,
}

/// Element types a collective can carry. Bf16 is stored as its raw `u16` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::Bf16 => 2,
        }
    }
}

/// A contiguous host buffer, reduced or broadcast in place.
#[derive(Debug)]
pub enum HostBuffer<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    /// bfloat16 values as raw bits (`half::bf16::to_bits`).
    Bf16(&'a mut [u16]),
}

impl HostBuffer<'_> {
    pub fn len(&self) -> usize {
        match self {
            HostBuffer::F32(b) => b.len(),
            HostBuffer::F64(b) => b.len(),
            HostBuffer::Bf16(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostBuffer::F32(_) => DType::F32,
            HostBuffer::F64(_) => DType::F64,
            HostBuffer::Bf16(_) => DType::Bf16,
        }
    }

    /// Divide every element by `divisor` (the average after a sum).
    pub fn scale_down(&mut self, divisor: usize) {
        let d = divisor as f64;
        match self {
            HostBuffer::F32(b) => b.iter_mut().for_each(|x| *x = (*x as f64 / d) as f32),
            HostBuffer::F64(b) => b.iter_mut().for_each(|x| *x /= d),
            HostBuffer::Bf16(b) => b
                .iter_mut()
                .for_each(|x| *x = half::bf16::from_f64(half::bf16::from_bits(*x).to_f64() / d).to_bits()),
        }
    }
}

/// A contiguous CUDA buffer: `len` elements of `dtype` at device pointer `ptr` on `device`.
/// The caller keeps the memory alive and unmodified until the collective returns.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBuffer {
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
    pub device: i32,
}

#[derive(Debug)]
pub enum Buffer<'a> {
    Host(HostBuffer<'a>),
    Device(DeviceBuffer),
}

impl<'a> From<HostBuffer<'a>> for Buffer<'a> {
    fn from(buffer: HostBuffer<'a>) -> Self {
        Buffer::Host(buffer)
    }
}

impl<'a> From<&'a mut [f32]> for Buffer<'a> {
    fn from(buffer: &'a mut [f32]) -> Self {
        Buffer::Host(HostBuffer::F32(buffer))
    }
}

impl<'a> From<&'a mut [f64]> for Buffer<'a> {
    fn from(buffer: &'a mut [f64]) -> Self {
        Buffer::Host(HostBuffer::F64(buffer))
    }
}

/// The collectives data-parallel training needs. All ranks call the same collectives in the same
/// order; each call blocks until it completes on this rank or its deadline passes.
pub trait Collective: Send {
    fn backend(&self) -> Backend;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The CUDA device whose memory this backend reduces (`Buffer::Device`), or `None` for a
    /// backend on host memory (`Buffer::Host`).
    fn cuda_device(&self) -> Option<i32>;
    /// The deadline each collective runs under.
    fn timeout(&self) -> Duration;
    fn all_reduce(&self, buffer: Buffer<'_>, op: ReduceOp) -> Result<()>;
    fn broadcast(&self, buffer: Buffer<'_>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Tear the group down after an error so no rank waits on this one: MPI aborts the job
    /// (every process exits with `code`), NCCL aborts the communicator.
    fn abort(&self, code: i32);
}

pub(crate) fn check_root(root: usize, world: usize, op: &'static str) -> Result<()> {
    if root >= world {
        return Err(Error::Invalid {
            what: op.to_string(),
            reason: format!("root rank {root} is outside a world of {world}"),
        });
    }
    Ok(())
}
