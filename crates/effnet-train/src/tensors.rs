//! Named tensors to and from safetensors bytes in memory, so checkpoints can go to any store
//! without a local temporary file.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, serialize};
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

/// Copy the tensors (on any device) into one safetensors buffer, keeping each dtype.
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.detach().to_device(Device::Cpu).contiguous();
        let (dtype, width) = dtype_of(tensor.kind())?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * width];
        // SAFETY: the tensor is contiguous on the CPU with numel elements of `width` bytes,
        // and `bytes` has exactly that length.
        unsafe {
            std::ptr::copy_nonoverlapping(tensor.data_ptr() as *const u8, bytes.as_mut_ptr(), bytes.len());
        }
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        raw.push((name.clone(), dtype, shape, bytes));
    }
    let views = raw
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Internal(format!("safetensors view of {name}: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    serialize(views, &None).map_err(|e| Error::Internal(format!("safetensors serialisation: {e:?}")))
}

/// Parse a safetensors buffer into CPU tensors by name.
pub fn from_safetensors(bytes: &[u8]) -> std::result::Result<HashMap<String, Tensor>, String> {
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e:?}"))?;
    let mut out = HashMap::new();
    for (name, view) in parsed.tensors() {
        let kind = kind_of(view.dtype()).map_err(|e| e.to_string())?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::from_data_size(view.data(), &shape, kind));
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
