//! Data-parallel synchronisation on top of a [`Collective`]: tensors mapped onto flat buffers.
//!
//! - [`DataParallel::broadcast_variables`]: every parameter and buffer from rank 0 (start, resume).
//! - [`DataParallel::sum_gradients`]: gradients packed into buckets of about
//!   `distributed.bucket_mb`, summed across ranks (optionally carried as bf16), then written
//!   back; the step divides the sum by the global sample count, so ranks with short or empty
//!   batches weigh exactly their samples and every rank steps on the same mean gradient.
//! - [`DataParallel::average_buffers`]: BatchNorm running statistics averaged across ranks
//!   before evaluation and checkpoints (each rank normalises its own batches in between).
//! - small helpers: sums of a few f64 (flags, evaluation counts) and an all-gather of bytes
//!   (every rank's data cursor for the checkpoint rank 0 writes).
//!
//! Host-memory backends (MPI) get CPU tensors' storage; device backends (NCCL) get CUDA device
//! pointers of tensors on the backend's GPU.

use std::time::{Duration, Instant};

use effnet_collective::{Buffer, Collective, DType, DeviceBuffer, HostBuffer, ReduceOp};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The element type gradients travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientDtype {
    F32,
    /// Half the bytes; each bucket is rounded to bf16 before the sum and summed in f32 per pair.
    Bf16,
}

pub struct DataParallel {
    collective: Box<dyn Collective>,
    bucket_bytes: usize,
    gradient_dtype: GradientDtype,
    device: Device,
    /// Time spent inside collectives since the last [`DataParallel::take_comm_time`].
    comm: Duration,
}

fn collective_error(error: effnet_collective::Error) -> Error {
    Error::Collective(error.to_string())
}

impl DataParallel {
    pub fn new(
        collective: Box<dyn Collective>,
        bucket_mb: f64,
        gradient_dtype: GradientDtype,
        device: Device,
    ) -> DataParallel {
        let bucket_bytes = ((bucket_mb * 1024.0 * 1024.0) as usize).max(4);
        DataParallel { collective, bucket_bytes, gradient_dtype, device, comm: Duration::ZERO }
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// Time spent in collectives since the last call.
    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut self.comm)
    }

    /// Run one collective on a contiguous tensor of the backend's memory kind.
    fn on_tensor(
        &mut self,
        tensor: &Tensor,
        call: impl FnOnce(&dyn Collective, Buffer<'_>) -> effnet_collective::Result<()>,
    ) -> Result<()> {
        let dtype = match tensor.kind() {
            Kind::Float => DType::F32,
            Kind::Double => DType::F64,
            Kind::BFloat16 => DType::Bf16,
            other => return Err(Error::Internal(format!("cannot all-reduce {other:?} tensors"))),
        };
        if !tensor.is_contiguous() {
            return Err(Error::Internal("collective on a non-contiguous tensor".into()));
        }
        let len = tensor.numel();
        if len == 0 {
            return Ok(());
        }
        let ptr = tensor.data_ptr();
        let started = Instant::now();
        let result = match (self.collective.cuda_device(), tensor.device()) {
            (Some(device), Device::Cuda(index)) if index as i32 == device => call(
                self.collective.as_ref(),
                Buffer::Device(DeviceBuffer { ptr: ptr as u64, len, dtype, device }),
            ),
            (None, Device::Cpu) => {
                // SAFETY: a contiguous CPU tensor of `len` elements of `dtype`, alive for this call
                // and not aliased by any other Rust reference while the collective runs.
                let host = unsafe {
                    match dtype {
                        DType::F32 => HostBuffer::F32(std::slice::from_raw_parts_mut(ptr as *mut f32, len)),
                        DType::F64 => HostBuffer::F64(std::slice::from_raw_parts_mut(ptr as *mut f64, len)),
                        DType::Bf16 => HostBuffer::Bf16(std::slice::from_raw_parts_mut(ptr as *mut u16, len)),
                    }
                };
                call(self.collective.as_ref(), Buffer::Host(host))
            }
            (want, got) => {
                return Err(Error::Internal(format!(
                    "the {} backend needs tensors on {}, got one on {got:?}",
                    self.collective.backend(),
                    want.map(|d| format!("cuda:{d}")).unwrap_or_else(|| "the CPU".into())
                )));
            }
        };
        self.comm += started.elapsed();
        result.map_err(collective_error)
    }

    /// The device collectives run on: the model's for NCCL, the CPU for MPI.
    fn comm_device(&self) -> Device {
        if self.collective.cuda_device().is_some() { self.device } else { Device::Cpu }
    }

    /// Copy every variable from rank 0 (parameters and buffers, in name order). Float tensors
    /// travel as f32, the rest (BatchNorm's step counters) as f64.
    pub fn broadcast_variables(&mut self, variables: &[(String, Tensor)]) -> Result<()> {
        for kind in [Kind::Float, Kind::Double] {
            let group: Vec<&Tensor> = variables
                .iter()
                .map(|(_, t)| t)
                .filter(|t| (t.kind() == Kind::Float) == (kind == Kind::Float))
                .collect();
            if group.is_empty() {
                continue;
            }
            let device = self.comm_device();
            let flat = tch::no_grad(|| {
                Tensor::cat(
                    &group
                        .iter()
                        .map(|t| t.to_device(device).to_kind(kind).reshape([-1]))
                        .collect::<Vec<_>>(),
                    0,
                )
            });
            self.on_tensor(&flat, |c, buffer| c.broadcast(buffer, 0))?;
            write_back(&group, &flat);
        }
        Ok(())
    }

    /// Sum the gradients of `parameters` across ranks, bucket by bucket (name order).
    /// Parameters without a gradient contribute zeros and are left without one.
    pub fn sum_gradients(&mut self, parameters: &[(String, Tensor)]) -> Result<()> {
        let grads: Vec<(Tensor, bool)> = parameters
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() { (g, true) } else { (p.zeros_like(), false) }
            })
            .collect();
        let element_bytes = match self.gradient_dtype {
            GradientDtype::F32 => 4,
            GradientDtype::Bf16 => 2,
        };
        let device = self.comm_device();
        let kind = match self.gradient_dtype {
            GradientDtype::F32 => Kind::Float,
            GradientDtype::Bf16 => Kind::BFloat16,
        };
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len()
                && (end == start || bytes + grads[end].0.numel() * element_bytes <= self.bucket_bytes)
            {
                bytes += grads[end].0.numel() * element_bytes;
                end += 1;
            }
            let bucket: Vec<&Tensor> = grads[start..end].iter().map(|(g, _)| g).collect();
            let flat = tch::no_grad(|| {
                Tensor::cat(&bucket.iter().map(|g| g.reshape([-1]).to_device(device)).collect::<Vec<_>>(), 0)
                    .to_kind(kind)
            });
            self.on_tensor(&flat, |c, buffer| c.all_reduce(buffer, ReduceOp::Sum))?;
            let written: Vec<&Tensor> = grads[start..end].iter().map(|(g, _)| g).collect();
            write_back(&written, &flat);
            start = end;
        }
        Ok(())
    }

    /// Average the non-trainable float variables (BatchNorm running mean and variance).
    pub fn average_buffers(&mut self, variables: &[(String, Tensor)]) -> Result<()> {
        let buffers: Vec<&Tensor> = variables
            .iter()
            .map(|(_, t)| t)
            .filter(|t| !t.requires_grad() && t.kind() == Kind::Float)
            .collect();
        if buffers.is_empty() {
            return Ok(());
        }
        let device = self.comm_device();
        let flat = tch::no_grad(|| {
            Tensor::cat(&buffers.iter().map(|t| t.reshape([-1]).to_device(device)).collect::<Vec<_>>(), 0)
        });
        self.on_tensor(&flat, |c, buffer| c.all_reduce(buffer, ReduceOp::Average))?;
        write_back(&buffers, &flat);
        Ok(())
    }

    /// Sum a few numbers over the ranks (flags, evaluation counts), in f64.
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        let tensor = Tensor::from_slice(values).to_device(self.comm_device());
        self.on_tensor(&tensor, |c, buffer| c.all_reduce(buffer, ReduceOp::Sum))?;
        let summed = Vec::<f64>::try_from(tensor.to_device(Device::Cpu))
            .map_err(|e| Error::Internal(format!("reading a reduced tensor: {e}")))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = self.world_size();
        let rank = self.rank();
        let mut lengths = vec![0.0; world];
        lengths[rank] = bytes.len() as f64;
        self.sum(&mut lengths)?;
        let lengths: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
        let offsets: Vec<usize> = lengths
            .iter()
            .scan(0, |acc, &l| {
                let at = *acc;
                *acc += l;
                Some(at)
            })
            .collect();
        let total: usize = lengths.iter().sum();
        // Bytes travel as exact small floats in each rank's own slot; the sum assembles them.
        let mut slots = vec![0f32; total];
        for (slot, &b) in slots[offsets[rank]..offsets[rank] + bytes.len()].iter_mut().zip(bytes) {
            *slot = b as f32;
        }
        let tensor = Tensor::from_slice(&slots).to_device(self.comm_device());
        self.on_tensor(&tensor, |c, buffer| c.all_reduce(buffer, ReduceOp::Sum))?;
        let all = Vec::<f32>::try_from(tensor.to_device(Device::Cpu))
            .map_err(|e| Error::Internal(format!("reading a gathered tensor: {e}")))?;
        Ok((0..world)
            .map(|r| all[offsets[r]..offsets[r] + lengths[r]].iter().map(|&v| v as u8).collect())
            .collect())
    }

    /// Rank 0's `bytes` on every rank.
    pub fn broadcast_bytes(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mine: &[u8] = if self.rank() == 0 { bytes } else { &[] };
        Ok(self.all_gather_bytes(mine)?.swap_remove(0))
    }

    pub fn barrier(&mut self) -> Result<()> {
        let started = Instant::now();
        let result = self.collective.barrier().map_err(collective_error);
        self.comm += started.elapsed();
        result
    }

    /// End every rank of the group after an error on this one.
    pub fn abort(&self, code: i32) {
        self.collective.abort(code);
    }
}

/// The collective group of a worker (`Launch::Worker`), or `None` for a single process.
pub fn connect(
    spec: &effnet_config::JobSpec,
    launch: crate::trainer::Launch,
    device: Device,
) -> Result<Option<DataParallel>> {
    let workers = spec.distributed.workers as usize;
    if launch == crate::trainer::Launch::Single {
        if workers > 1 {
            return Err(Error::invalid(
                "distributed.workers",
                format!(
                    "{workers} workers need a launcher: `effnet run` starts them, or `mpirun -n {workers} effnet worker JOB.yaml`"
                ),
            ));
        }
        return Ok(None);
    }
    let backend = match (spec.distributed.backend, device) {
        (Some(effnet_config::Backend::Mpi), _) => effnet_collective::Backend::Mpi,
        (Some(effnet_config::Backend::Nccl), _) => effnet_collective::Backend::Nccl,
        (Some(effnet_config::Backend::Local), _) => {
            return Err(Error::invalid(
                "distributed.backend",
                "local trains in one process; workers need mpi (CPU) or nccl (CUDA)",
            ));
        }
        (None, Device::Cuda(_)) => effnet_collective::Backend::Nccl,
        (None, _) => effnet_collective::Backend::Mpi,
    };
    let timeout = std::time::Duration::from_secs_f64(spec.distributed.timeout_s);
    let collective: Box<dyn Collective> = match backend {
        effnet_collective::Backend::Mpi => {
            if device.is_cuda() {
                return Err(Error::invalid(
                    "distributed.backend",
                    "mpi reduces host memory; with device cuda use nccl",
                ));
            }
            Box::new(effnet_collective::Mpi::init(timeout).map_err(collective_error)?)
        }
        effnet_collective::Backend::Nccl => {
            if !device.is_cuda() {
                return Err(Error::invalid("distributed.backend", "nccl needs distributed.device: cuda"));
            }
            let info = effnet_collective::WorldInfo::from_env()
                .map_err(|e| Error::invalid("environment", e.to_string()))?;
            let address = effnet_collective::rendezvous::address_from_env();
            Box::new(effnet_collective::Nccl::init(&info, &address, timeout).map_err(collective_error)?)
        }
    };
    if collective.world_size() != workers {
        return Err(Error::invalid(
            "distributed.workers",
            format!("{workers} workers asked for, but the launcher started {}", collective.world_size()),
        ));
    }
    let gradient_dtype = match spec.distributed.gradient_dtype {
        effnet_config::GradientDtype::F32 => GradientDtype::F32,
        effnet_config::GradientDtype::Bf16 => GradientDtype::Bf16,
    };
    Ok(Some(DataParallel::new(collective, spec.distributed.bucket_mb, gradient_dtype, device)))
}

/// Copy consecutive slices of `flat` back into `targets` (converting dtype and device).
fn write_back(targets: &[&Tensor], flat: &Tensor) {
    tch::no_grad(|| {
        let mut offset = 0;
        for target in targets {
            let n = target.numel() as i64;
            let part = flat.narrow(0, offset, n).view(target.size().as_slice());
            let mut target = target.shallow_clone();
            target.copy_(&part);
            offset += n;
        }
    });
}
