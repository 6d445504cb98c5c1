//! Per-channel normalisation of 8-bit pixels into f32 CHW, the layout and values a model expects.

use crate::error::{Error, Result};
use crate::image::Image;

/// Per-channel mean and standard deviation on the [0, 1] scale (ToTensor then Normalize):
/// `out = (pixel / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// ImageNet RGB statistics, the torchvision/timm default.
    pub const IMAGENET: Normalization =
        Normalization { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

    /// Fashion-MNIST grey statistics (training set: mean 0.2860, std 0.3530), repeated over three
    /// channels so it also serves grey images replicated to RGB.
    pub const FASHION_MNIST: Normalization = Normalization { mean: [0.2860; 3], std: [0.3530; 3] };

    /// Checked constructor: every std must be positive and finite, every mean finite.
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidConfig {
                field: "normalization",
                reason: format!("needs finite means and positive stds, got mean {mean:?} std {std:?}"),
            });
        }
        Ok(Normalization { mean, std })
    }

    /// Same statistics for one grey channel (used for every channel).
    pub fn grey(mean: f32, std: f32) -> Result<Self> {
        Normalization::new([mean; 3], [std; 3])
    }

    /// 256-entry lookup tables per channel: normalising becomes one load per value, no arithmetic,
    /// and the result is bit-identical to computing `(v / 255 - mean) / std` in f32.
    pub(crate) fn tables(&self) -> [[f32; 256]; 3] {
        let mut tables = [[0f32; 256]; 3];
        for (c, table) in tables.iter_mut().enumerate() {
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        tables
    }
}

/// Write `image` normalised into `out` as `channels` × height × width f32 (CHW), mirrored left-right
/// when `flip` is set (folding the flip into this pass saves a pass over the pixels).
///
/// A grey image written to 3 channels is replicated; `channels` 1 needs a grey image (convert with
/// [`Image::to_grey`] first, which the transforms do before augmenting).
pub(crate) fn normalize_into(
    image: &Image,
    tables: &[[f32; 256]; 3],
    channels: u8,
    flip: bool,
    out: &mut [f32],
) -> Result<()> {
    let (w, h) = (image.width as usize, image.height as usize);
    let plane = w * h;
    let expected = plane * channels as usize;
    if out.len() != expected {
        return Err(Error::SlotSize { expected, found: out.len() });
    }
    if channels == 1 && image.channels != 1 {
        return Err(Error::InvalidConfig {
            field: "channels",
            reason: "1-channel output needs a grey image".into(),
        });
    }
    let source_channels = image.channels as usize;
    for c in 0..channels as usize {
        let table = &tables[c];
        let source_channel = if source_channels == 1 { 0 } else { c };
        let out_plane = &mut out[c * plane..(c + 1) * plane];
        for (row_in, row_out) in
            image.data.chunks_exact(w * source_channels).zip(out_plane.chunks_exact_mut(w))
        {
            let values = row_in.iter().skip(source_channel).step_by(source_channels);
            if flip {
                for (o, &v) in row_out.iter_mut().rev().zip(values) {
                    *o = table[v as usize];
                }
            } else {
                for (o, &v) in row_out.iter_mut().zip(values) {
                    *o = table[v as usize];
                }
            }
        }
    }
    Ok(())
}

/// Public form of the normalisation pass: `image` → CHW f32 in `out` with `channels` (1 or 3) planes.
pub fn normalize(
    image: &Image,
    normalization: &Normalization,
    channels: u8,
    flip: bool,
    out: &mut [f32],
) -> Result<()> {
    normalize_into(image, &normalization.tables(), channels, flip, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_values_hand_computed() {
        let image = Image { width: 2, height: 1, channels: 3, data: vec![0, 128, 255, 255, 0, 51] };
        let mut out = vec![0f32; 6];
        normalize(&image, &Normalization::IMAGENET, 3, false, &mut out).unwrap();
        // Red plane: (0 - 0.485) / 0.229 = -2.117904, (1 - 0.485) / 0.229 = 2.248908.
        // Green plane: (128/255 - 0.456) / 0.224 = 0.205182, (0 - 0.456) / 0.224 = -2.035714.
        // Blue plane: (1 - 0.406) / 0.225 = 2.64, (0.2 - 0.406) / 0.225 = -0.915556.
        let expected = [-2.117904, 2.248908, 0.205182, -2.035714, 2.64, -0.915556];
        for (got, want) in out.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn flip_reverses_each_row_exactly() {
        let image = Image { width: 3, height: 2, channels: 1, data: vec![1, 2, 3, 4, 5, 6] };
        let identity = Normalization::new([0.0; 3], [1.0 / 255.0; 3]).unwrap();
        let mut out = vec![0f32; 6];
        normalize(&image, &identity, 1, true, &mut out).unwrap();
        assert_eq!(out, vec![3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
    }

    #[test]
    fn grey_is_replicated_to_three_planes_or_kept_as_one() {
        let image = Image { width: 2, height: 1, channels: 1, data: vec![0, 255] };
        let stats = Normalization::FASHION_MNIST;
        let mut three = vec![0f32; 6];
        normalize(&image, &stats, 3, false, &mut three).unwrap();
        let (low, high) = (-0.2860 / 0.3530, (1.0 - 0.2860) / 0.3530);
        for plane in three.chunks(2) {
            assert!((plane[0] - low).abs() < 1e-6 && (plane[1] - high).abs() < 1e-6, "{three:?}");
        }
        let mut one = vec![0f32; 2];
        normalize(&image, &stats, 1, false, &mut one).unwrap();
        assert_eq!(one, three[..2]);
    }

    #[test]
    fn wrong_slot_size_and_bad_stats_are_errors() {
        let image = Image::filled(4, 4, 3, 0);
        let mut out = vec![0f32; 47];
        let err = normalize(&image, &Normalization::IMAGENET, 3, false, &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "output slot holds 47 floats, the transform writes 48 (channels x height x width)"
        );
        assert!(normalize(&image, &Normalization::IMAGENET, 1, false, &mut out[..16]).is_err());
        assert!(Normalization::new([0.5; 3], [0.2, 0.0, 0.2]).is_err());
        assert!(Normalization::grey(f32::NAN, 1.0).is_err());
    }
}
