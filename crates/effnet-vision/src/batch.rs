//! A batch assembled in place: one contiguous N×C×H×W f32 buffer plus labels and keys.
//!
//! Workers write each sample straight into its slot (the transforms normalise into it), and the
//! finished `Vec<f32>` is handed to the tensor library as is (`Tensor::from_slice` or a
//! `from_blob` over the Vec), so pixels are never copied after normalisation.

/// One sample's share of a [`BatchBuffer`]: disjoint from every other slot, so slots can be filled
/// from different threads at once.
#[derive(Debug)]
pub struct SampleSlot<'a> {
    pub pixels: &'a mut [f32],
    pub label: &'a mut i64,
    pub key: &'a mut String,
}

/// The owned contents of a finished batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchParts {
    /// N×C×H×W, row-major (the NCHW layout PyTorch models take).
    pub pixels: Vec<f32>,
    pub labels: Vec<i64>,
    pub keys: Vec<String>,
    /// [N, C, H, W] as i64, the type tensor shapes use.
    pub shape: [i64; 4],
}

impl BatchParts {
    /// A batch of no samples of the given per-sample shape (a rank with nothing left to read).
    pub fn empty(channels: i64, height: i64, width: i64) -> BatchParts {
        BatchParts {
            pixels: Vec::new(),
            labels: Vec::new(),
            keys: Vec::new(),
            shape: [0, channels, height, width],
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Append `other`'s samples (same per-sample shape) after this batch's.
    pub fn append(&mut self, other: BatchParts) -> Result<(), String> {
        if other.shape[1..] != self.shape[1..] {
            return Err(format!(
                "cannot append samples of shape {:?} to a batch of {:?}",
                other.shape, self.shape
            ));
        }
        self.pixels.extend_from_slice(&other.pixels);
        self.labels.extend(other.labels);
        self.keys.extend(other.keys);
        self.shape[0] = self.labels.len() as i64;
        Ok(())
    }
}

/// Contiguous storage for `batch_size` samples of `channels` × `height` × `width` floats.
#[derive(Clone, Debug)]
pub struct BatchBuffer {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    keys: Vec<String>,
    channels: usize,
    height: usize,
    width: usize,
}

impl BatchBuffer {
    /// A zeroed batch. Labels start at -1 (no class) so an unfilled slot is visible.
    pub fn new(batch_size: usize, channels: u8, height: u32, width: u32) -> BatchBuffer {
        let sample_len = channels as usize * height as usize * width as usize;
        BatchBuffer {
            pixels: vec![0.0; batch_size * sample_len],
            labels: vec![-1; batch_size],
            keys: vec![String::new(); batch_size],
            channels: channels as usize,
            height: height as usize,
            width: width as usize,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Floats per sample (C·H·W): the slot length a transform must fill.
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// [N, C, H, W].
    pub fn shape(&self) -> [i64; 4] {
        [self.len() as i64, self.channels as i64, self.height as i64, self.width as i64]
    }

    /// Sample `index`'s pixels. Panics when `index >= len()`, like slice indexing.
    pub fn slot_mut(&mut self, index: usize) -> &mut [f32] {
        let n = self.sample_len();
        &mut self.pixels[index * n..(index + 1) * n]
    }

    pub fn slot(&self, index: usize) -> &[f32] {
        let n = self.sample_len();
        &self.pixels[index * n..(index + 1) * n]
    }

    /// Every sample's slot, in order; collect them and hand disjoint groups to threads.
    pub fn samples_mut(&mut self) -> impl ExactSizeIterator<Item = SampleSlot<'_>> {
        let n = self.sample_len().max(1);
        self.pixels
            .chunks_exact_mut(n)
            .zip(self.labels.iter_mut())
            .zip(self.keys.iter_mut())
            .map(|((pixels, label), key)| SampleSlot { pixels, label, key })
    }

    /// Keep the first `len` samples (the short last batch of an epoch) without reallocating.
    pub fn truncate(&mut self, len: usize) {
        self.pixels.truncate(len * self.sample_len());
        self.labels.truncate(len);
        self.keys.truncate(len);
    }

    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }

    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Give up the buffers (no copy) for conversion into tensors.
    pub fn into_parts(self) -> BatchParts {
        let shape = self.shape();
        BatchParts { pixels: self.pixels, labels: self.labels, keys: self.keys, shape }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_contiguous_and_fillable_in_parallel() {
        let mut batch = BatchBuffer::new(6, 3, 4, 5);
        assert_eq!(batch.shape(), [6, 3, 4, 5]);
        assert_eq!(batch.sample_len(), 60);
        let pixels_ptr = batch.pixels().as_ptr();
        let mut slots: Vec<SampleSlot<'_>> = batch.samples_mut().collect();
        std::thread::scope(|scope| {
            for (worker, group) in slots.chunks_mut(4).enumerate() {
                scope.spawn(move || {
                    for (offset, slot) in group.iter_mut().enumerate() {
                        let index = worker * 4 + offset;
                        slot.pixels.fill(index as f32);
                        *slot.label = index as i64 * 10;
                        *slot.key = format!("sample-{index}");
                    }
                });
            }
        });
        assert_eq!(batch.slot(0), &[0.0; 60][..]);
        assert_eq!(batch.slot(5), &[5.0; 60][..]);
        batch.slot_mut(2)[59] = -1.0;
        assert_eq!(batch.pixels()[2 * 60 + 59], -1.0);
        assert_eq!(batch.labels(), &[0, 10, 20, 30, 40, 50]);
        assert_eq!(batch.keys()[3], "sample-3");

        batch.truncate(4);
        let parts = batch.into_parts();
        assert_eq!(parts.shape, [4, 3, 4, 5]);
        assert_eq!(parts.pixels.len(), 240);
        // The pixels are the very allocation the slots were written into.
        assert_eq!(parts.pixels.as_ptr(), pixels_ptr);
    }

    #[test]
    fn parts_append_keeps_order_and_checks_shape() {
        let one = |value: f32, key: &str| BatchParts {
            pixels: vec![value; 4],
            labels: vec![value as i64],
            keys: vec![key.to_string()],
            shape: [1, 1, 2, 2],
        };
        let mut batch = one(1.0, "a");
        batch.append(one(2.0, "b")).unwrap();
        assert_eq!(batch.shape, [2, 1, 2, 2]);
        assert_eq!(batch.pixels, [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(batch.keys, ["a", "b"]);
        assert_eq!(batch.len(), 2);
        let err = batch.append(BatchParts::empty(3, 2, 2)).unwrap_err();
        assert!(err.contains("[0, 3, 2, 2]"), "{err}");
        assert!(BatchParts::empty(1, 2, 2).is_empty());
    }

    #[test]
    fn new_batch_marks_unfilled_labels() {
        let batch = BatchBuffer::new(2, 1, 2, 2);
        assert_eq!(batch.labels(), &[-1, -1]);
        assert!(batch.pixels().iter().all(|&v| v == 0.0));
        assert!(!batch.is_empty());
        assert!(BatchBuffer::new(0, 3, 2, 2).is_empty());
    }
}
