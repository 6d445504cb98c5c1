//! Data-parallel synchronisation on top of a [`Collective`]: tensors mapped onto flat buffers.
//!
//! - [`DataParallel::broadcast_variables`]: every parameter and buffer from rank 0 (start, resume).
//! - [`DataParallel::sum_gradients`]: gradients packed into buckets of about
//!   `distributed.bucket_mb` ([`DataParallel::buckets`]), summed across ranks (optionally carried as bf16), then written
//!   back; the step divides the sum by the global sample count, so ranks with short or empty
//!   batches weigh exactly their samples and every rank steps on the same mean gradient.
//! - [`DataParallel::with_comm_thread`]: a thread that owns the collective during a step and
//!   reduces what it is sent, in order ([`CommQueue`]); [`OverlappedSum`] sends it gradient
//!   buckets from backward's post-accumulate-grad hooks (`distributed.overlap`), SyncBatchNorm its
//!   statistics.
//! - [`DataParallel::average_buffers`]: BatchNorm running statistics averaged across ranks
//!   before evaluation and checkpoints (each rank normalises its own batches in between).
//! - small helpers: sums of a few f64 (flags, evaluation counts) and an all-gather of bytes
//!   (every rank's data cursor for the checkpoint rank 0 writes).
//!
//! Host-memory backends (MPI) get CPU tensors' storage; device backends (NCCL) get CUDA device
//! pointers of tensors on the backend's GPU.

use std::sync::mpsc;
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

impl GradientDtype {
    fn bytes(self) -> usize {
        match self {
            GradientDtype::F32 => 4,
            GradientDtype::Bf16 => 2,
        }
    }

    fn kind(self) -> Kind {
        match self {
            GradientDtype::F32 => Kind::Float,
            GradientDtype::Bf16 => Kind::BFloat16,
        }
    }
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
        let started = Instant::now();
        let result = on_tensor(self.collective.as_ref(), tensor, call);
        self.comm += started.elapsed();
        result
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

    /// Sum the gradients of `parameters` across ranks after backward, bucket by bucket (the
    /// buckets of [`DataParallel::buckets`], in order). Parameters without a gradient contribute
    /// zeros and are left without one.
    pub fn sum_gradients(&mut self, parameters: &[(String, Tensor)], buckets: &Buckets) -> Result<()> {
        let parameters: Vec<Tensor> = parameters.iter().map(|(_, t)| t.shallow_clone()).collect();
        let device = self.comm_device();
        for bucket in 0..buckets.len() {
            let flat = buckets.pack(&parameters, bucket, device);
            self.on_tensor(&flat, |c, buffer| c.all_reduce(buffer, ReduceOp::Sum))?;
            buckets.unpack(&parameters, bucket, &flat);
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

    /// Run `f` with a communication thread that owns the collective meanwhile: what `f` sends
    /// through the [`CommQueue`] (SyncBatchNorm's sums from forward and backward, gradient
    /// buckets launched from backward hooks) is reduced there, in the order sent, while `f` goes
    /// on computing. Every rank must send the same reductions in the same order. The thread's
    /// busy time counts as communication time.
    pub fn with_comm_thread<T>(&mut self, f: impl FnOnce(&CommQueue) -> T) -> T {
        let (sender, receiver) = mpsc::channel::<Message>();
        let device = self.comm_device();
        let collective: &mut dyn Collective = self.collective.as_mut();
        let (output, busy) = std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let collective: &dyn Collective = collective;
                let mut busy = Duration::ZERO;
                while let Ok(Message::Reduce { tensor, op, reply }) = receiver.recv() {
                    let started = Instant::now();
                    let result =
                        on_tensor(collective, &tensor, |c, buffer| c.all_reduce(buffer, op)).map(|()| tensor);
                    busy += started.elapsed();
                    let _ = reply.send(result);
                }
                busy
            });
            let queue = CommQueue { sender: sender.clone(), device };
            let output = f(&queue);
            // Closures kept by an autograd graph may hold the queue: stop by message, not by
            // the last sender going away.
            let _ = sender.send(Message::Stop);
            (output, worker.join().unwrap_or_default())
        });
        self.comm += busy;
        output
    }

    /// The trainable parameters split into buckets of about `distributed.bucket_mb` (for
    /// [`DataParallel::sum_gradients`] and [`OverlappedSum`]), in the reverse of `registration` order (the order the model creates
    /// them: stem first), so the buckets whose gradients backward produces first come first.
    /// `parameters` and `registration` hold the same tensors.
    pub fn buckets(&self, parameters: &[(String, Tensor)], registration: &[&Tensor]) -> Buckets {
        let position: std::collections::HashMap<usize, usize> =
            registration.iter().enumerate().map(|(i, t)| (t.data_ptr() as usize, i)).collect();
        let mut order: Vec<usize> = (0..parameters.len()).collect();
        order.sort_by_key(|&i| {
            std::cmp::Reverse(position.get(&(parameters[i].1.data_ptr() as usize)).copied())
        });
        let element_bytes = self.gradient_dtype.bytes();
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0;
        for index in order {
            let size = parameters[index].1.numel() * element_bytes;
            match buckets.last_mut() {
                Some(bucket) if bytes + size <= self.bucket_bytes => {
                    bucket.push(index);
                    bytes += size;
                }
                _ => {
                    buckets.push(vec![index]);
                    bytes = size;
                }
            }
        }
        let mut of_parameter = vec![0; parameters.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            for &i in bucket {
                of_parameter[i] = b;
            }
        }
        Buckets { buckets, of_parameter, kind: self.gradient_dtype.kind() }
    }
}

enum Message {
    Reduce { tensor: Tensor, op: ReduceOp, reply: mpsc::Sender<Result<Tensor>> },
    Stop,
}

/// Sends reductions to the communication thread of [`DataParallel::with_comm_thread`].
#[derive(Clone)]
pub struct CommQueue {
    sender: mpsc::Sender<Message>,
    /// Where the backend reduces: the model's CUDA device for NCCL, the CPU for MPI.
    device: Device,
}

/// A reduction under way.
pub struct Pending(mpsc::Receiver<Result<Tensor>>);

impl Pending {
    /// The reduced tensor, once the communication thread has it.
    pub fn wait(self) -> Result<Tensor> {
        self.0.recv().map_err(|_| Error::Collective("the communication thread stopped".into()))?
    }
}

impl CommQueue {
    pub fn device(&self) -> Device {
        self.device
    }

    /// Start the all-reduce of `tensor` (moved to the backend's device and made contiguous; a
    /// copy when it is already there, so the caller's tensor is never written).
    pub fn start(&self, tensor: &Tensor, op: ReduceOp) -> Pending {
        let tensor = tch::no_grad(|| {
            let moved = tensor.to_device(self.device).contiguous();
            if moved.data_ptr() == tensor.data_ptr() { moved.copy() } else { moved }
        });
        let (reply, receiver) = mpsc::channel();
        if let Err(mpsc::SendError(Message::Reduce { reply, .. })) =
            self.sender.send(Message::Reduce { tensor, op, reply })
        {
            let _ = reply.send(Err(Error::Collective("the communication thread stopped".into())));
        }
        Pending(receiver)
    }

    /// The all-reduce of `tensor`, waited for.
    pub fn reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.start(tensor, op).wait()
    }
}

/// Gradient buckets: parameter indices per bucket in launch order, and each parameter's bucket.
pub struct Buckets {
    buckets: Vec<Vec<usize>>,
    of_parameter: Vec<usize>,
    kind: Kind,
}

impl Buckets {
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The gradients of bucket `bucket` packed into one flat tensor of the wire's element type on
    /// `device` (zeros for a parameter without a gradient).
    fn pack(&self, parameters: &[Tensor], bucket: usize, device: Device) -> Tensor {
        tch::no_grad(|| {
            let parts: Vec<Tensor> = self.buckets[bucket]
                .iter()
                .map(|&i| {
                    let grad = parameters[i].grad();
                    let grad = if grad.defined() { grad } else { parameters[i].zeros_like() };
                    grad.reshape([-1]).to_device(device).to_kind(self.kind)
                })
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    /// Write a bucket's reduced `flat` back into the gradients (a parameter without one gets a
    /// throwaway buffer: it stays without one).
    fn unpack(&self, parameters: &[Tensor], bucket: usize, flat: &Tensor) {
        let targets: Vec<Tensor> = self.buckets[bucket]
            .iter()
            .map(|&i| {
                let grad = parameters[i].grad();
                if grad.defined() { grad } else { parameters[i].zeros_like() }
            })
            .collect();
        write_back(&targets.iter().collect::<Vec<_>>(), flat);
    }
}

struct OverlapState {
    /// Gradients each bucket still waits for.
    waiting: Vec<usize>,
    /// The next bucket to launch: buckets go out strictly in order, so every rank launches the
    /// same all-reduces in the same order whatever order its hooks fire in.
    next: usize,
    launched: Vec<Pending>,
    /// Shallow copies of the parameters (here, under the lock: tensors are not `Sync`, and on
    /// CUDA hooks run on libtorch's device thread).
    parameters: Vec<Tensor>,
}

/// The gradient sum overlapped with backward (PyTorch DDP's Reducer): each parameter's
/// post-accumulate-grad hook calls [`OverlappedSum::ready`]; a bucket whose gradients are all
/// there is packed and its all-reduce started on the communication thread while backward goes
/// on; [`OverlappedSum::finish`] launches what is left (gradients a rank never produced count as
/// zeros), waits, and writes the sums back.
pub struct OverlappedSum<'a> {
    queue: &'a CommQueue,
    buckets: &'a Buckets,
    state: std::sync::Mutex<OverlapState>,
}

impl<'a> OverlappedSum<'a> {
    pub fn new(queue: &'a CommQueue, parameters: &'a [(String, Tensor)], buckets: &'a Buckets) -> Self {
        let waiting = buckets.buckets.iter().map(Vec::len).collect();
        let parameters = parameters.iter().map(|(_, t)| t.shallow_clone()).collect();
        OverlappedSum {
            queue,
            buckets,
            state: std::sync::Mutex::new(OverlapState { waiting, next: 0, launched: Vec::new(), parameters }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OverlapState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The gradient of parameter `index` is complete.
    pub fn ready(&self, index: usize) {
        let mut state = self.lock();
        let bucket = self.buckets.of_parameter[index];
        state.waiting[bucket] = state.waiting[bucket].saturating_sub(1);
        self.launch_ready(&mut state);
    }

    fn launch_ready(&self, state: &mut OverlapState) {
        while state.next < self.buckets.len() && state.waiting[state.next] == 0 {
            let flat = self.buckets.pack(&state.parameters, state.next, self.queue.device);
            state.launched.push(self.queue.start(&flat, ReduceOp::Sum));
            state.next += 1;
        }
    }

    /// Launch the buckets not launched yet, wait for every sum and write it back into the
    /// gradients (parameters without one stay without one).
    pub fn finish(self) -> Result<()> {
        let (launched, parameters) = {
            let mut state = self.lock();
            state.waiting.iter_mut().for_each(|w| *w = 0);
            self.launch_ready(&mut state);
            (std::mem::take(&mut state.launched), std::mem::take(&mut state.parameters))
        };
        for (bucket, pending) in launched.into_iter().enumerate() {
            self.buckets.unpack(&parameters, bucket, &pending.wait()?);
        }
        Ok(())
    }
}

/// Run one collective on a contiguous tensor of the backend's memory kind.
fn on_tensor(
    collective: &dyn Collective,
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
    let result = match (collective.cuda_device(), tensor.device()) {
        (Some(device), Device::Cuda(index)) if index as i32 == device => {
            call(collective, Buffer::Device(DeviceBuffer { ptr: ptr as u64, len, dtype, device }))
        }
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
            call(collective, Buffer::Host(host))
        }
        (want, got) => {
            return Err(Error::Internal(format!(
                "the {} backend needs tensors on {}, got one on {got:?}",
                collective.backend(),
                want.map(|d| format!("cuda:{d}")).unwrap_or_else(|| "the CPU".into())
            )));
        }
    };
    result.map_err(collective_error)
}

/// The collective group of a worker (`Launch::Worker`), or `None` for a single process.
pub fn connect(
    spec: &effnet_config::JobSpec,
    launch: crate::trainer::Launch,
    device: Device,
    rendezvous: Option<&dyn effnet_collective::rendezvous::Rendezvous>,
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
            // The coordinator's rendezvous for its workers, else MASTER_ADDR:MASTER_PORT with
            // EFFNET_RENDEZVOUS_TOKEN, or a token derived from the job as every rank read it:
            // the hash of the whole spec (credentials in its URLs included), so another job's
            // ranks on the same port are refused.
            let spec_bytes = serde_json::to_vec(spec).map_err(|e| Error::Internal(e.to_string()))?;
            let job_token = crate::checkpoint::sha256_hex(&spec_bytes);
            let tcp = effnet_collective::rendezvous::Tcp::from_env(&job_token);
            let rendezvous = rendezvous.unwrap_or(&tcp);
            Box::new(effnet_collective::Nccl::init(&info, rendezvous, timeout).map_err(collective_error)?)
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
