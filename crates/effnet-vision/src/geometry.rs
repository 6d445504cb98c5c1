//! Where to crop: RandomResizedCrop boxes for training and resize-then-centre-crop for evaluation,
//! with torchvision's arithmetic so crops have the same distribution as the reference recipe.

use crate::error::{Error, Result};
use crate::rng::SampleRng;

/// An integer crop box in pixels of the full-size image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// A crop region in (possibly fractional) source pixels; what the resizer samples from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl From<CropBox> for Region {
    fn from(b: CropBox) -> Region {
        Region { left: b.left as f64, top: b.top as f64, width: b.width as f64, height: b.height as f64 }
    }
}

impl Region {
    /// The same region in an image scaled by (`sx`, `sy`): how a crop chosen on the full-size image
    /// maps onto a DCT-reduced decode.
    pub fn scaled(self, sx: f64, sy: f64) -> Region {
        Region { left: self.left * sx, top: self.top * sy, width: self.width * sx, height: self.height * sy }
    }
}

/// torchvision's `RandomResizedCrop` box sampling: a random area fraction in `scale` and a
/// log-uniform aspect ratio in `ratio`, 10 attempts, then a centre crop clamped to the ratio bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
}

impl Default for RandomResizedCrop {
    /// The ImageNet recipe: 8%–100% of the area, aspect ratio 3/4–4/3.
    fn default() -> Self {
        RandomResizedCrop { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) }
    }
}

impl RandomResizedCrop {
    /// Checked constructor: `0 < scale.0 <= scale.1 <= 1` and `0 < ratio.0 <= ratio.1`, finite.
    pub fn new(scale: (f64, f64), ratio: (f64, f64)) -> Result<Self> {
        let ok_scale = scale.0 > 0.0 && scale.0 <= scale.1 && scale.1 <= 1.0;
        if !ok_scale {
            return Err(Error::InvalidConfig {
                field: "random_resized_crop.scale",
                reason: format!("must satisfy 0 < min <= max <= 1, got {scale:?}"),
            });
        }
        if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
            return Err(Error::InvalidConfig {
                field: "random_resized_crop.ratio",
                reason: format!("must satisfy 0 < min <= max < inf, got {ratio:?}"),
            });
        }
        Ok(RandomResizedCrop { scale, ratio })
    }

    /// Draw a crop box for a `width` × `height` image.
    pub fn sample(&self, width: u32, height: u32, rng: &mut SampleRng) -> CropBox {
        let area = width as f64 * height as f64;
        let (log_min, log_max) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * rng.uniform(self.scale.0, self.scale.1);
            let aspect = rng.uniform(log_min, log_max).exp();
            let w = (target_area * aspect).sqrt().round() as u32;
            let h = (target_area / aspect).sqrt().round() as u32;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = rng.below(height - h + 1);
                let left = rng.below(width - w + 1);
                return CropBox { left, top, width: w, height: h };
            }
        }
        self.fallback(width, height)
    }

    /// The centre crop used when 10 attempts failed: the whole image, trimmed to the nearest
    /// allowed aspect ratio.
    pub fn fallback(&self, width: u32, height: u32) -> CropBox {
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (width, ((width as f64 / self.ratio.0).round() as u32).clamp(1, height))
        } else if in_ratio > self.ratio.1 {
            (((height as f64 * self.ratio.1).round() as u32).clamp(1, width), height)
        } else {
            (width, height)
        };
        CropBox { left: (width - w) / 2, top: (height - h) / 2, width: w, height: h }
    }
}

/// Evaluation geometry: resize the shorter side to `floor(size / crop_pct)` (torchvision `Resize`,
/// longer side truncated), then take the centre `size` × `size` (torchvision `CenterCrop`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalGeometry {
    /// Size of the image after the shorter-side resize.
    pub resized_width: u32,
    pub resized_height: u32,
    /// The centre crop in resized coordinates.
    pub crop: CropBox,
    /// The same crop in source pixels, so one resize of just this region does both steps.
    pub source: Region,
}

/// Compute [`EvalGeometry`] for a `width` × `height` image. `crop_pct` is timm's name; 0.875 gives the
/// classic 256 → 224.
pub fn eval_geometry(width: u32, height: u32, size: u32, crop_pct: f64) -> EvalGeometry {
    let short_target = ((size as f64 / crop_pct) + 1e-9).floor().max(size as f64) as u32;
    let (resized_width, resized_height) = if width <= height {
        (short_target, (short_target as u64 * height as u64 / width as u64) as u32)
    } else {
        ((short_target as u64 * width as u64 / height as u64) as u32, short_target)
    };
    // torchvision: int(round((resized - size) / 2.0)); Python rounds halves to even.
    let centre = |resized: u32| ((resized.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    let crop = CropBox {
        left: centre(resized_width),
        top: centre(resized_height),
        width: size.min(resized_width),
        height: size.min(resized_height),
    };
    let sx = width as f64 / resized_width as f64;
    let sy = height as f64 / resized_height as f64;
    EvalGeometry { resized_width, resized_height, crop, source: Region::from(crop).scaled(sx, sy) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_crops_stay_inside_and_within_bounds() {
        let rrc = RandomResizedCrop::default();
        let mut fallbacks = 0;
        for (width, height) in [(500u32, 375u32), (375, 500), (224, 224), (1000, 120), (33, 900)] {
            let area = (width * height) as f64;
            for seed in 0..2000 {
                let mut rng = SampleRng::new(seed, 0, "crop");
                let b = rrc.sample(width, height, &mut rng);
                assert!(b.width >= 1 && b.height >= 1);
                assert!(b.left + b.width <= width && b.top + b.height <= height, "{b:?} in {width}x{height}");
                if b == rrc.fallback(width, height) {
                    fallbacks += 1;
                    continue;
                }
                // Rounding to whole pixels moves area and ratio a little off the continuous bounds.
                let fraction = (b.width * b.height) as f64 / area;
                let slack = 1.0 + 2.0 / b.width.min(b.height) as f64;
                assert!(fraction >= 0.08 / slack / slack && fraction <= 1.0 * slack * slack, "{fraction}");
                let ratio = b.width as f64 / b.height as f64;
                assert!(ratio >= 0.75 / slack && ratio <= 4.0 / 3.0 * slack, "ratio {ratio} of {b:?}");
            }
        }
        // Extreme aspect ratios (1000x120, 33x900) force the fallback often; typical photos rarely.
        assert!(fallbacks > 0);
    }

    #[test]
    fn crops_are_spread_over_the_image() {
        let rrc = RandomResizedCrop::default();
        let mut sum_fraction = 0.0;
        let (mut min_left, mut max_right) = (u32::MAX, 0);
        for seed in 0..4000 {
            let b = rrc.sample(500, 375, &mut SampleRng::new(seed, 1, "spread"));
            sum_fraction += (b.width * b.height) as f64 / (500.0 * 375.0);
            min_left = min_left.min(b.left);
            max_right = max_right.max(b.left + b.width);
        }
        let mean = sum_fraction / 4000.0;
        // E[area fraction] for uniform [0.08, 1] is 0.54; rejected draws (too wide) pull it down.
        assert!((0.35..0.6).contains(&mean), "mean area fraction {mean}");
        assert_eq!((min_left, max_right), (0, 500));
    }

    #[test]
    fn fallback_clamps_to_ratio_bounds_and_centres() {
        let rrc = RandomResizedCrop::default();
        // Too wide: height kept, width = round(100 * 4/3) = 133, centred.
        assert_eq!(rrc.fallback(1000, 100), CropBox { left: 433, top: 0, width: 133, height: 100 });
        // Too tall: width kept, height = round(90 / 0.75) = 120.
        assert_eq!(rrc.fallback(90, 1000), CropBox { left: 0, top: 440, width: 90, height: 120 });
        assert_eq!(rrc.fallback(500, 375), CropBox { left: 0, top: 0, width: 500, height: 375 });
        // An impossible scale range (min area larger than any box can fit at these ratios) takes the
        // fallback on every draw.
        let narrow = RandomResizedCrop::new((1.0, 1.0), (1.0, 1.0)).unwrap();
        let b = narrow.sample(300, 200, &mut SampleRng::new(3, 0, "k"));
        assert_eq!(b, CropBox { left: 50, top: 0, width: 200, height: 200 });
    }

    #[test]
    fn invalid_parameters_are_rejected_with_the_value() {
        let err = RandomResizedCrop::new((0.5, 0.2), (0.75, 1.33)).unwrap_err();
        assert!(err.to_string().contains("(0.5, 0.2)"), "{err}");
        assert!(RandomResizedCrop::new((0.1, 1.0), (0.0, 1.0)).is_err());
        assert!(RandomResizedCrop::new((0.1, 1.5), (0.5, 1.0)).is_err());
    }

    #[test]
    fn eval_geometry_of_imagenet_sized_image() {
        let g = eval_geometry(500, 375, 224, 0.875);
        assert_eq!((g.resized_width, g.resized_height), (341, 256));
        // (341 - 224) / 2 = 58.5 rounds to even 58; (256 - 224) / 2 = 16.
        assert_eq!(g.crop, CropBox { left: 58, top: 16, width: 224, height: 224 });
        assert!((g.source.top - 16.0 * 375.0 / 256.0).abs() < 1e-9);
        assert!((g.source.width - 224.0 * 500.0 / 341.0).abs() < 1e-9);
        assert!((g.source.height - 224.0 * 375.0 / 256.0).abs() < 1e-9);

        let portrait = eval_geometry(375, 500, 224, 0.875);
        assert_eq!((portrait.resized_width, portrait.resized_height), (256, 341));
        assert_eq!(portrait.crop, CropBox { left: 16, top: 58, width: 224, height: 224 });
        let b3 = eval_geometry(640, 480, 300, 0.904);
        assert_eq!(b3.resized_height, 331); // floor(300 / 0.904) = 331
        assert_eq!(
            eval_geometry(100, 100, 224, 1.0).crop,
            CropBox { left: 0, top: 0, width: 224, height: 224 }
        );
    }
}
