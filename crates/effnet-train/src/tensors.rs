//! Named tensors to and from safetensors bytes in memory, so checkpoints can go to any store
//! without a local temporary file.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

fn dtype_of(kind: Kind) -> Result<(Dtype, usize)> {
    Ok(match kind {
        Kind::Float => (Dtype::F32, 4),
        Kind::Double => (Dtype::F64, 8),
        Kind::Half => (Dtype::F16, 2),
        Kind::BFloat16 => (Dtype::BF16, 2),
        Kind::Int64 => (Dtype::I64, 8),
        Kind::Int => (Dtype::I32, 4),
        other => return Err(Error::Internal(format!("cannot checkpoint tensors of kind {other:?}"))),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        other => return Err(Error::Internal(format!("unsupported safetensors dtype {other:?}"))),
    })
}

/// Copy the tensors (on any device, of any layout) into one safetensors buffer, keeping each
/// dtype. A checkpoint is assembled on the training thread, and this is most of what a save
/// costs it, so each tensor is copied once, by libtorch, straight from where it lives (a GPU
/// included) into its place in the buffer, and the buffer is one a finished save gave back
/// ([`recycle`]) where there is one: filling a gigabyte of fresh pages costs more than the copy
/// itself. The bytes are those of safetensors' own `serialize` (its order: alignment, then
/// name; the same header).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut entries = tensors
        .iter()
        .map(|(name, tensor)| {
            let (dtype, width) = dtype_of(tensor.kind())?;
            let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
            let len = shape.iter().product::<usize>() * width;
            Ok((name, tensor, dtype, shape, len))
        })
        .collect::<Result<Vec<_>>>()?;
    entries.sort_by(|left, right| right.2.cmp(&left.2).then(left.0.cmp(right.0)));
    let mut header = String::from("{");
    let mut offset = 0;
    for (index, (name, _, dtype, shape, len)) in entries.iter().enumerate() {
        let info = TensorInfo { dtype: *dtype, shape: shape.clone(), data_offsets: (offset, offset + len) };
        offset += len;
        let unwritable = |e: serde_json::Error| Error::Internal(format!("safetensors header of {name}: {e}"));
        if index > 0 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name).map_err(unwritable)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(unwritable)?);
    }
    header.push('}');
    header.extend(std::iter::repeat_n(' ', (8 - header.len() % 8) % 8));
    let mut buffer = spare_buffer(8 + header.len() + offset);
    buffer.extend_from_slice(&(header.len() as u64).to_le_bytes());
    buffer.extend_from_slice(header.as_bytes());
    for (name, tensor, _, _, len) in entries {
        if len == 0 {
            continue;
        }
        let spare = buffer.spare_capacity_mut();
        // SAFETY: the spare capacity holds at least `len` bytes (the buffer was sized for every
        // tensor); the blob tensor over them lives only inside this block, and the bytes count
        // as initialised only after libtorch's copy has filled all of them.
        unsafe {
            let mut target = Tensor::f_from_blob(
                spare.as_mut_ptr() as *const u8,
                &tensor.size(),
                &[],
                tensor.kind(),
                Device::Cpu,
            )?;
            tch::no_grad(|| target.f_copy_(tensor))
                .map_err(|e| Error::Internal(format!("copying {name} out: {e}")))?;
            buffer.set_len(buffer.len() + len);
        }
    }
    Ok(buffer)
}

/// The buffers of the last finished save, for the next save's files: between saves a worker holds
/// at most one checkpoint's bytes, which the next save would allocate anyway.
static SPARE: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Smaller files are not worth keeping.
const SPARE_MIN_BYTES: usize = 1 << 20;

/// An empty buffer of at least `capacity` bytes: the smallest spare one that fits, or a new one.
fn spare_buffer(capacity: usize) -> Vec<u8> {
    if capacity < SPARE_MIN_BYTES {
        return Vec::with_capacity(capacity);
    }
    let mut spare = SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let fitting = spare
        .iter()
        .enumerate()
        .filter(|(_, buffer)| buffer.capacity() >= capacity)
        .min_by_key(|(_, buffer)| buffer.capacity())
        .map(|(index, _)| index);
    match fitting {
        Some(index) => {
            let mut buffer = spare.swap_remove(index);
            buffer.clear();
            buffer
        }
        None => Vec::with_capacity(capacity),
    }
}

/// Give a finished save's files back for the next save, replacing whatever spare buffers that
/// save left unused. A file something else still holds (the in-memory store keeps the bytes it
/// is given) is not kept, nor is one under a mebibyte. Returns how many were kept.
pub fn recycle(files: Vec<bytes::Bytes>) -> usize {
    let kept: Vec<Vec<u8>> = files
        .into_iter()
        .filter(|file| file.len() >= SPARE_MIN_BYTES)
        .filter_map(|file| file.try_into_mut().ok())
        .map(Vec::from)
        .collect();
    let count = kept.len();
    *SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = kept;
    count
}

/// The bytes the spare buffers hold.
#[cfg(test)]
fn spare_bytes() -> usize {
    SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(Vec::capacity).sum()
}

/// Parse a safetensors buffer into CPU tensors by name.
pub fn from_safetensors(bytes: &[u8]) -> std::result::Result<HashMap<String, Tensor>, String> {
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e:?}"))?;
    let mut out = HashMap::new();
    for (name, view) in parsed.tensors() {
        let kind = kind_of(view.dtype()).map_err(|e| e.to_string())?;
        // The safetensors crate checks that the shape's product fits the data, so a dimension
        // too large for libtorch can only come with another of 0: refused, as is anything
        // libtorch refuses, rather than panicking.
        let shape = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| {
                format!("tensor {name} has shape {:?}, beyond what a tensor can have", view.shape())
            })?;
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| format!("tensor {name} with shape {shape:?}: {e}"))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Copy `source` into the variables of `vs` strictly: the same names and shapes, nothing changed
/// unless everything matches. The error names the first difference.
pub fn load_into(
    vs: &tch::nn::VarStore,
    mut source: HashMap<String, Tensor>,
) -> std::result::Result<(), String> {
    let variables = vs.variables();
    for (name, variable) in &variables {
        let found = source.get(name).ok_or_else(|| format!("tensor {name} is missing"))?;
        if found.size() != variable.size() {
            return Err(format!(
                "tensor {name} has shape {:?}, the model {:?}",
                found.size(),
                variable.size()
            ));
        }
    }
    if let Some(extra) = source.keys().find(|name| !variables.contains_key(*name)) {
        return Err(format!("unexpected tensor {extra}"));
    }
    tch::no_grad(|| {
        for (name, mut variable) in variables {
            let tensor = source.remove(&name).expect("checked above");
            variable.copy_(&tensor.to_kind(variable.kind()).to_device(variable.device()));
        }
    });
    Ok(())
}

/// A batch's images and labels as tensors on a device. On the CPU the image tensor is a view of
/// the batch's own buffer, which the loader's workers filled in place, so the pixels are never
/// copied. On a GPU they land in pinned (page-locked) host memory from libtorch's caching host
/// allocator and are copied to the device without blocking the host: the copy is queued behind
/// the work already on the stream (the previous micro-batch's backward) while the host goes on
/// (the pinned block is held until the copy has run). The borrow keeps the buffer alive while the
/// tensors (and the autograd graph that saves the input) use it.
pub struct BatchTensors<'a> {
    pub images: Tensor,
    pub labels: Tensor,
    _batch: std::marker::PhantomData<&'a effnet_vision::BatchParts>,
}

pub fn batch_tensors(batch: &effnet_vision::BatchParts, device: Device) -> Result<BatchTensors<'_>> {
    let expected: i64 = batch.shape.iter().product();
    if expected != batch.pixels.len() as i64 || batch.shape[0] != batch.labels.len() as i64 {
        return Err(Error::Internal(format!(
            "a batch of shape {:?} holds {} floats and {} labels",
            batch.shape,
            batch.pixels.len(),
            batch.labels.len()
        )));
    }
    // SAFETY: `pixels` is a live, initialised, contiguous f32 buffer of exactly `shape`'s
    // element count, borrowed for the lifetime of the returned tensors.
    let images = unsafe {
        Tensor::f_from_blob(batch.pixels.as_ptr() as *const u8, &batch.shape, &[], Kind::Float, Device::Cpu)?
    };
    let labels = Tensor::from_slice(&batch.labels);
    let to_device = |tensor: Tensor| -> Result<Tensor> {
        Ok(match device {
            Device::Cuda(_) => {
                tensor.f_pin_memory(device)?.f_to_device_(device, tensor.kind(), true, false)?
            }
            _ => tensor.to_device(device),
        })
    };
    Ok(BatchTensors {
        images: to_device(images)?,
        labels: to_device(labels)?,
        _batch: std::marker::PhantomData,
    })
}

/// The variables of `vs` sorted by name, so orders never depend on a hash map.
pub fn sorted_variables(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bitwise() {
        let _generator = crate::global_generator();
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[1i64, -7, 9]);
        let bytes =
            to_safetensors(&[("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())]).unwrap();
        let back = from_safetensors(&bytes).unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
        assert_eq!(back["a"].size(), vec![3, 4]);
        assert!(from_safetensors(b"junk").is_err());
    }

    #[test]
    fn files_are_what_safetensors_writes_from_copied_bytes() {
        let _generator = crate::global_generator();
        let tensors: Vec<(String, Tensor)> = vec![
            ("w".into(), Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).transpose(0, 1)),
            ("half".into(), Tensor::randn([5], (Kind::BFloat16, Device::Cpu))),
            ("count".into(), Tensor::from_slice(&[7i64])),
            ("empty".into(), Tensor::zeros([0, 2], (Kind::Float, Device::Cpu))),
        ];
        let copied: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, tensor)| {
                let tensor = tensor.contiguous();
                let (dtype, width) = dtype_of(tensor.kind()).unwrap();
                let mut bytes = vec![0u8; tensor.numel() * width];
                tensor.copy_data_u8(&mut bytes, tensor.numel());
                let shape = tensor.size().iter().map(|&d| d as usize).collect();
                (name.clone(), dtype, shape, bytes)
            })
            .collect();
        let views = copied.iter().map(|(name, dtype, shape, bytes)| {
            (name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        });
        let expected = safetensors::tensor::serialize(views, &None).unwrap();
        assert_eq!(to_safetensors(&tensors).unwrap(), expected);
        let back = from_safetensors(&expected).unwrap();
        assert!(back["w"].equal(&tensors[0].1));
        assert_eq!(back["empty"].size(), [0, 2]);
    }

    #[test]
    fn buffers_are_given_back_only_when_unshared_and_at_most_one_save_is_kept() {
        let _generator = crate::global_generator();
        let big =
            |value: f64| vec![("w".to_string(), Tensor::full([3 << 18], value, (Kind::Float, Device::Cpu)))];
        let first = bytes::Bytes::from(to_safetensors(&big(1.0)).unwrap());
        let size = first.len();
        let held = first.clone();
        let small = bytes::Bytes::from(vec![0u8; 16]);
        assert_eq!(recycle(vec![first, small.clone()]), 0, "a buffer still held elsewhere, a small file");
        assert_eq!(recycle(vec![held, small]), 1);
        assert_eq!(spare_bytes(), size);
        // The next file takes the spare buffer (same address), and holds exactly the new values.
        let address = SPARE.lock().unwrap()[0].as_ptr();
        let second = to_safetensors(&big(2.0)).unwrap();
        assert_eq!(second.as_ptr(), address);
        assert_eq!(spare_bytes(), 0);
        let back = from_safetensors(&second).unwrap();
        assert!(back["w"].equal(&big(2.0)[0].1));
        assert_eq!(
            second.len(),
            8 + u64::from_le_bytes(second[..8].try_into().unwrap()) as usize + (3 << 20)
        );
        // A save replaces the spares rather than adding to them.
        let files = (0..3).map(|i| bytes::Bytes::from(to_safetensors(&big(i as f64)).unwrap())).collect();
        assert_eq!(recycle(files), 3);
        assert_eq!(recycle(vec![bytes::Bytes::from(second)]), 1);
        assert_eq!(spare_bytes(), size);
    }

    #[test]
    fn batch_images_are_a_view_of_the_buffer() {
        let batch = effnet_vision::BatchParts {
            pixels: (0..24).map(|v| v as f32).collect(),
            labels: vec![3, 1],
            keys: vec!["a".into(), "b".into()],
            shape: [2, 3, 2, 2],
        };
        let tensors = batch_tensors(&batch, Device::Cpu).unwrap();
        assert_eq!(tensors.images.size(), [2, 3, 2, 2]);
        assert_eq!(tensors.images.data_ptr() as *const f32, batch.pixels.as_ptr());
        assert_eq!(tensors.images.double_value(&[1, 2, 1, 1]), 23.0);
        assert_eq!(Vec::<i64>::try_from(&tensors.labels).unwrap(), [3, 1]);
        let short = effnet_vision::BatchParts { labels: vec![1], ..batch.clone() };
        assert!(batch_tensors(&short, Device::Cpu).is_err());
    }
}
