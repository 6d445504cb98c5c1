//! One conformance suite for every backend: each case fills a buffer with values that depend on
//! the rank, runs one collective, and compares every element with the exact expected result.
//! Values are small integers, exact in every dtype, so the comparison is equality.
//!
//! Device backends (NCCL) get the same host data staged through CUDA memory.

use std::time::Instant;

use serde::Serialize;

use crate::{Buffer, Collective, DType, DeviceBuffer, Error, HostBuffer, ReduceOp, Result};

/// The default gradient bucket (25 MB of f32): one case is one element larger.
pub const BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub elements: usize,
    pub passed: bool,
    /// The first mismatch, when the case failed.
    pub detail: Option<String>,
    pub seconds: f64,
}

/// Host data of one dtype.
enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bf16(Vec<u16>),
}

impl Data {
    fn new(dtype: DType, values: &[f64]) -> Data {
        match dtype {
            DType::F32 => Data::F32(values.iter().map(|&v| v as f32).collect()),
            DType::F64 => Data::F64(values.to_vec()),
            DType::Bf16 => Data::Bf16(values.iter().map(|&v| half::bf16::from_f64(v).to_bits()).collect()),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::Bf16(_) => DType::Bf16,
        }
    }

    fn host(&mut self) -> HostBuffer<'_> {
        match self {
            Data::F32(v) => HostBuffer::F32(v),
            Data::F64(v) => HostBuffer::F64(v),
            Data::Bf16(v) => HostBuffer::Bf16(v),
        }
    }

    /// (pointer, elements) of the storage, for device copies.
    fn raw(&mut self) -> (*mut u8, usize) {
        match self {
            Data::F32(v) => (v.as_mut_ptr() as *mut u8, v.len()),
            Data::F64(v) => (v.as_mut_ptr() as *mut u8, v.len()),
            Data::Bf16(v) => (v.as_mut_ptr() as *mut u8, v.len()),
        }
    }

    fn values(&self) -> Vec<f64> {
        match self {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::Bf16(v) => v.iter().map(|&b| half::bf16::from_bits(b).to_f64()).collect(),
        }
    }
}

type Call<'c> = dyn Fn(Buffer<'_>) -> Result<()> + 'c;

/// Run `call` on `data`, through CUDA memory when the backend reduces device buffers.
fn run_on(collective: &dyn Collective, data: &mut Data, call: &Call<'_>) -> Result<()> {
    let Some(device) = collective.cuda_device() else {
        return call(Buffer::Host(data.host()));
    };
    use cudarc::driver::sys as cuda;
    let dtype = data.dtype();
    let (host, len) = data.raw();
    let bytes = len * dtype.size();
    let mut ptr: cuda::CUdeviceptr = 0;
    let failed = |what: &str, status: cuda::CUresult| Error::Failed {
        op: "staging",
        rank: collective.rank(),
        backend: collective.backend(),
        reason: format!("{what}: {status:?}"),
    };
    // SAFETY: the NCCL backend made the device's primary context current; `host` holds `bytes`.
    unsafe {
        let status = cuda::cuMemAlloc_v2(&mut ptr, bytes.max(1));
        if status != cuda::CUresult::CUDA_SUCCESS {
            return Err(failed("cuMemAlloc", status));
        }
        let status = cuda::cuMemcpyHtoD_v2(ptr, host as *const _, bytes);
        if status != cuda::CUresult::CUDA_SUCCESS {
            cuda::cuMemFree_v2(ptr);
            return Err(failed("cuMemcpyHtoD", status));
        }
    }
    let result = call(Buffer::Device(DeviceBuffer { ptr, len, dtype, device }));
    // SAFETY: as above.
    unsafe {
        let status = cuda::cuMemcpyDtoH_v2(host as *mut _, ptr, bytes);
        cuda::cuMemFree_v2(ptr);
        if result.is_ok() && status != cuda::CUresult::CUDA_SUCCESS {
            return Err(failed("cuMemcpyDtoH", status));
        }
    }
    result
}

/// Element i of `rank`'s data: `(rank + 1) * (i mod 97) + rank`, different on every rank.
fn rank_values(rank: usize, n: usize) -> Vec<f64> {
    (0..n).map(|i| ((rank + 1) * (i % 97) + rank) as f64).collect()
}

fn sum_over_ranks(world: usize, n: usize, f: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    (0..n).map(|i| (0..world).map(|r| f(r, i)).sum()).collect()
}

/// bf16 cases keep every sum below 256, where bf16's 8-bit mantissa is exact.
fn small_value(rank: usize, i: usize) -> f64 {
    ((i % 7) + rank) as f64
}

fn compare(got: &[f64], want: &[f64]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} elements, expected {}", got.len(), want.len()));
    }
    got.iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .map(|i| format!("element {i} is {}, expected {}", got[i], want[i]))
}

fn case(
    results: &mut Vec<CaseResult>,
    name: String,
    elements: usize,
    body: impl FnOnce() -> Result<Option<String>>,
) -> Result<()> {
    let started = Instant::now();
    let detail = body()?;
    results.push(CaseResult {
        name,
        elements,
        passed: detail.is_none(),
        detail,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(())
}

/// The sizes every all-reduce case runs at: 1, 1000, 10^6 and one element more than a bucket.
pub const SIZES: [usize; 4] = [1, 1000, 1_000_000, BUCKET_ELEMENTS + 1];

/// Run the suite. Every rank must call it; every rank checks its own results. A collective error
/// (timeout, dead peer) ends the suite with that error.
pub fn run(collective: &dyn Collective) -> Result<Vec<CaseResult>> {
    let rank = collective.rank();
    let world = collective.world_size();
    let mut results = Vec::new();
    for &n in &SIZES {
        for (op, label) in [(ReduceOp::Sum, "sum"), (ReduceOp::Average, "average")] {
            case(&mut results, format!("all_reduce {label} f32"), n, || {
                let mut data = Data::new(DType::F32, &rank_values(rank, n));
                run_on(collective, &mut data, &|buffer| collective.all_reduce(buffer, op))?;
                let mut want = sum_over_ranks(world, n, |r, i| ((r + 1) * (i % 97) + r) as f64);
                if op == ReduceOp::Average {
                    want.iter_mut().for_each(|w| *w = (*w / world as f64) as f32 as f64);
                }
                Ok(compare(&data.values(), &want))
            })?;
        }
    }
    case(&mut results, "all_reduce sum f64".into(), 1000, || {
        let mut data = Data::new(DType::F64, &rank_values(rank, 1000));
        run_on(collective, &mut data, &|buffer| collective.all_reduce(buffer, ReduceOp::Sum))?;
        Ok(compare(&data.values(), &sum_over_ranks(world, 1000, |r, i| ((r + 1) * (i % 97) + r) as f64)))
    })?;
    for n in [1000, 1_000_000] {
        case(&mut results, "all_reduce sum bf16".into(), n, || {
            let values: Vec<f64> = (0..n).map(|i| small_value(rank, i)).collect();
            let mut data = Data::new(DType::Bf16, &values);
            run_on(collective, &mut data, &|buffer| collective.all_reduce(buffer, ReduceOp::Sum))?;
            Ok(compare(&data.values(), &sum_over_ranks(world, n, small_value)))
        })?;
    }
    for n in [1000, 1_000_000] {
        for root in [0, world - 1] {
            case(&mut results, format!("broadcast from rank {root} f32"), n, || {
                let mut data = Data::new(DType::F32, &rank_values(rank, n));
                run_on(collective, &mut data, &|buffer| collective.broadcast(buffer, root))?;
                Ok(compare(&data.values(), &rank_values(root, n)))
            })?;
        }
    }
    case(&mut results, "barrier".into(), 0, || {
        collective.barrier()?;
        Ok(None)
    })?;
    Ok(results)
}

/// All-reduce (sum, f32) bandwidth at one size: the mean seconds per call over `iterations`
/// after one warm-up call, and the bus bandwidth in GB/s (NCCL's definition:
/// `bytes * 2 * (world - 1) / world / seconds`). For a device backend each call is staged
/// through host memory like the conformance cases, so the figure includes two PCIe copies and
/// understates NCCL's own bandwidth.
pub fn bandwidth(collective: &dyn Collective, elements: usize, iterations: usize) -> Result<(f64, f64)> {
    let mut data = Data::new(DType::F32, &vec![1.0; elements]);
    run_on(collective, &mut data, &|buffer| collective.all_reduce(buffer, ReduceOp::Sum))?;
    let started = Instant::now();
    for _ in 0..iterations.max(1) {
        run_on(collective, &mut data, &|buffer| collective.all_reduce(buffer, ReduceOp::Sum))?;
    }
    let seconds = started.elapsed().as_secs_f64() / iterations.max(1) as f64;
    let world = collective.world_size() as f64;
    let bus = (elements * 4) as f64 * 2.0 * (world - 1.0) / world / seconds / 1e9;
    Ok((seconds, bus))
}
