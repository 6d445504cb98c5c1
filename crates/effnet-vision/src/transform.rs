//! The per-sample pipelines: encoded bytes in, normalised CHW floats written into a batch slot.
//!
//! Training: probe size → draw crop box and flip → pick a DCT reduction → decode → resize the crop
//! → (grey) → RandAugment → normalise (+ flip) into the slot. Evaluation: probe → resize shorter side
//! and centre crop, done as one resize of the centre region → normalise. All random draws come from
//! the caller's [`SampleRng`] and depend only on the image size, so a sample's augmentation is fixed
//! by (seed, epoch, key) whichever worker runs it.

use std::cell::RefCell;

use fast_image_resize::Resizer;

use crate::decode::{DEFAULT_MAX_PIXELS, decode_planned, paying_reduction};
use crate::error::{Error, Result};
use crate::geometry::{CropBox, RandomResizedCrop, Region, eval_geometry};
use crate::image::Image;
use crate::normalize::{Normalization, normalize_into};
use crate::randaugment::RandAugment;
use crate::rng::SampleRng;

/// How many channels the model takes and how images are converted to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelPolicy {
    /// 3 channels; grey images are replicated.
    Rgb,
    /// 1 channel; colour images are converted with PIL's luma weights.
    Grey,
}

impl ChannelPolicy {
    pub fn channels(self) -> u8 {
        match self {
            ChannelPolicy::Rgb => 3,
            ChannelPolicy::Grey => 1,
        }
    }
}

/// Training augmentation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Output side in pixels (224 for B0).
    pub size: u32,
    pub crop: RandomResizedCrop,
    /// Probability of a horizontal flip (0.5 in the reference recipe).
    pub flip_probability: f64,
    pub rand_augment: Option<RandAugment>,
    pub normalization: Normalization,
    pub channels: ChannelPolicy,
    /// Decode JPEGs at 1/4 or 1/8 when the crop is at least that much larger than the output
    /// (1/2 is slower than a full decode, see [`crate::decode::MIN_PAYING_REDUCTION`]).
    /// Changes pixel values slightly (a DCT reduction is not the same filter as the resize), never
    /// the crop geometry.
    pub dct_downscale: bool,
    /// Decoded-pixel budget (width × height) checked from the header before decoding; larger
    /// images fail as corrupt samples ([`crate::decode::DEFAULT_MAX_PIXELS`], Pillow's limit).
    pub max_pixels: u64,
}

impl TrainConfig {
    /// The ImageNet recipe at `size`: RandomResizedCrop(0.08–1, 3/4–4/3), flip 0.5, no RandAugment,
    /// ImageNet statistics, RGB, DCT downscaling on.
    pub fn imagenet(size: u32) -> TrainConfig {
        TrainConfig {
            size,
            crop: RandomResizedCrop::default(),
            flip_probability: 0.5,
            rand_augment: None,
            normalization: Normalization::IMAGENET,
            channels: ChannelPolicy::Rgb,
            dct_downscale: true,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// Evaluation preprocessing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    pub size: u32,
    /// Fraction of the resized shorter side kept by the centre crop (0.875: 256 → 224).
    pub crop_pct: f64,
    pub normalization: Normalization,
    pub channels: ChannelPolicy,
    pub dct_downscale: bool,
    /// As [`TrainConfig::max_pixels`].
    pub max_pixels: u64,
}

impl EvalConfig {
    pub fn imagenet(size: u32) -> EvalConfig {
        EvalConfig {
            size,
            crop_pct: 0.875,
            normalization: Normalization::IMAGENET,
            channels: ChannelPolicy::Rgb,
            dct_downscale: true,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// A validated [`TrainConfig`] with its normalisation tables precomputed.
#[derive(Clone, Debug)]
pub struct TrainTransform {
    config: TrainConfig,
    tables: [[f32; 256]; 3],
}

/// A validated [`EvalConfig`] with its normalisation tables precomputed.
#[derive(Clone, Debug)]
pub struct EvalTransform {
    config: EvalConfig,
    tables: [[f32; 256]; 3],
}

/// Per-thread scratch: the resizer keeps its SIMD buffers and the resized image its allocation
/// between samples, and full-size decodes reuse one buffer, so the steady state allocates only for
/// DCT-reduced decodes and RandAugment.
struct Scratch {
    resizer: Resizer,
    decoded: Vec<u8>,
    resized: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch { resizer: Resizer::new(), decoded: Vec::new(), resized: Vec::new() });
}

fn check_size(size: u32) -> Result<()> {
    if size == 0 || size > 4096 {
        return Err(Error::InvalidConfig {
            field: "size",
            reason: format!("must be in 1..=4096, got {size}"),
        });
    }
    Ok(())
}

fn check_max_pixels(max_pixels: u64) -> Result<()> {
    if max_pixels == 0 {
        return Err(Error::InvalidConfig { field: "max_pixels", reason: "must be at least 1, got 0".into() });
    }
    Ok(())
}

impl TrainTransform {
    pub fn new(config: TrainConfig) -> Result<TrainTransform> {
        check_size(config.size)?;
        check_max_pixels(config.max_pixels)?;
        RandomResizedCrop::new(config.crop.scale, config.crop.ratio)?;
        Normalization::new(config.normalization.mean, config.normalization.std)?;
        if !(0.0..=1.0).contains(&config.flip_probability) {
            return Err(Error::InvalidConfig {
                field: "flip_probability",
                reason: format!("must be in [0, 1], got {}", config.flip_probability),
            });
        }
        if let Some(ra) = config.rand_augment {
            RandAugment::new(ra.num_ops, ra.magnitude)?;
        }
        let tables = config.normalization.tables();
        Ok(TrainTransform { config, tables })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Floats written per sample: channels × size × size.
    pub fn sample_len(&self) -> usize {
        self.config.channels.channels() as usize * (self.config.size as usize).pow(2)
    }

    /// Decode `bytes`, augment with draws from `rng`, and write normalised CHW floats into `out`
    /// (exactly [`Self::sample_len`] long).
    pub fn apply(&self, bytes: &[u8], rng: &mut SampleRng, out: &mut [f32]) -> Result<()> {
        let config = &self.config;
        if out.len() != self.sample_len() {
            return Err(Error::SlotSize { expected: self.sample_len(), found: out.len() });
        }
        let mut crop = CropBox { left: 0, top: 0, width: 1, height: 1 };
        let mut flip = false;
        SCRATCH.with_borrow_mut(|scratch| {
            let (header, decoded) = decode_planned(
                bytes,
                |header| {
                    crop = config.crop.sample(header.width, header.height, rng);
                    flip = rng.chance(config.flip_probability);
                    if config.dct_downscale {
                        paying_reduction(crop.width, crop.height, config.size, config.size)
                    } else {
                        1
                    }
                },
                std::mem::take(&mut scratch.decoded),
                config.max_pixels,
            )?;
            let region = Region::from(crop).scaled(
                decoded.width as f64 / header.width as f64,
                decoded.height as f64 / header.height as f64,
            );
            let mut resized = resize_with(scratch, &decoded, region, config.size, config.channels)?;
            if let Some(ra) = &config.rand_augment {
                resized = ra.apply(resized, rng);
            }
            let result = normalize_into(&resized, &self.tables, config.channels.channels(), flip, out);
            scratch.resized = resized.data;
            scratch.decoded = decoded.data;
            result
        })
    }
}

impl EvalTransform {
    pub fn new(config: EvalConfig) -> Result<EvalTransform> {
        check_size(config.size)?;
        check_max_pixels(config.max_pixels)?;
        Normalization::new(config.normalization.mean, config.normalization.std)?;
        if !(config.crop_pct > 0.0 && config.crop_pct <= 1.0) {
            return Err(Error::InvalidConfig {
                field: "crop_pct",
                reason: format!("must be in (0, 1], got {}", config.crop_pct),
            });
        }
        let tables = config.normalization.tables();
        Ok(EvalTransform { config, tables })
    }

    pub fn config(&self) -> &EvalConfig {
        &self.config
    }

    pub fn sample_len(&self) -> usize {
        self.config.channels.channels() as usize * (self.config.size as usize).pow(2)
    }

    /// Decode, resize the shorter side to `size / crop_pct`, centre-crop `size`, and normalise into
    /// `out`. Deterministic: no random draws.
    pub fn apply(&self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        let config = &self.config;
        if out.len() != self.sample_len() {
            return Err(Error::SlotSize { expected: self.sample_len(), found: out.len() });
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut geometry = None;
            let (header, decoded) = decode_planned(
                bytes,
                |header| {
                    let g = eval_geometry(header.width, header.height, config.size, config.crop_pct);
                    geometry = Some(g);
                    let (w, h) = (g.source.width as u32, g.source.height as u32);
                    if config.dct_downscale { paying_reduction(w, h, config.size, config.size) } else { 1 }
                },
                std::mem::take(&mut scratch.decoded),
                config.max_pixels,
            )?;
            let geometry = geometry
                .unwrap_or_else(|| eval_geometry(header.width, header.height, config.size, config.crop_pct));
            let region = geometry.source.scaled(
                decoded.width as f64 / header.width as f64,
                decoded.height as f64 / header.height as f64,
            );
            let resized = resize_with(scratch, &decoded, region, config.size, config.channels)?;
            let result = normalize_into(&resized, &self.tables, config.channels.channels(), false, out);
            scratch.resized = resized.data;
            scratch.decoded = decoded.data;
            result
        })
    }
}

/// Resize `region` to `size` × `size` into the scratch buffer (taken out of it; the caller puts the
/// allocation back) and convert to grey when the policy asks for it. Converting after the resize
/// touches size² pixels instead of the whole photo.
fn resize_with(
    scratch: &mut Scratch,
    decoded: &Image,
    region: Region,
    size: u32,
    policy: ChannelPolicy,
) -> Result<Image> {
    let mut data = std::mem::take(&mut scratch.resized);
    crate::resize::resize_region_into(&mut scratch.resizer, decoded, region, size, size, &mut data)?;
    let resized = Image { width: size, height: size, channels: decoded.channels, data };
    Ok(match policy {
        ChannelPolicy::Grey if resized.channels == 3 => resized.to_grey(),
        _ => resized,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::probe;
    use crate::decode::tests::{encode_jpeg, synthetic_rgb};
    use crate::normalize::normalize;
    use crate::resize::resize_region;

    fn jpeg_500x375() -> Vec<u8> {
        encode_jpeg(&synthetic_rgb(500, 375), 90)
    }

    #[test]
    fn train_is_deterministic_per_seed_epoch_key() {
        let transform = TrainTransform::new(TrainConfig::imagenet(64)).unwrap();
        let bytes = jpeg_500x375();
        let run = |seed, epoch, key: &str| {
            let mut out = vec![0f32; transform.sample_len()];
            transform.apply(&bytes, &mut SampleRng::new(seed, epoch, key), &mut out).unwrap();
            out
        };
        let base = run(1, 0, "a");
        assert_eq!(base, run(1, 0, "a"));
        assert_ne!(base, run(1, 1, "a"));
        assert_ne!(base, run(1, 0, "b"));
        assert_ne!(base, run(2, 0, "a"));
    }

    #[test]
    fn train_output_equals_the_steps_done_by_hand() {
        let mut config = TrainConfig::imagenet(48);
        config.dct_downscale = false;
        let transform = TrainTransform::new(config).unwrap();
        let bytes = jpeg_500x375();
        let mut out = vec![0f32; transform.sample_len()];
        transform.apply(&bytes, &mut SampleRng::new(9, 3, "k"), &mut out).unwrap();

        let mut rng = SampleRng::new(9, 3, "k");
        let crop = RandomResizedCrop::default().sample(500, 375, &mut rng);
        let flip = rng.chance(0.5);
        let decoded = crate::decode::decode(&bytes).unwrap();
        let resized = resize_region(&decoded, Region::from(crop), 48, 48).unwrap();
        let mut expected = vec![0f32; 3 * 48 * 48];
        normalize(&resized, &Normalization::IMAGENET, 3, flip, &mut expected).unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn flip_probability_one_mirrors_probability_zero() {
        let bytes = jpeg_500x375();
        let run = |p| {
            let mut config = TrainConfig::imagenet(32);
            config.flip_probability = p;
            let transform = TrainTransform::new(config).unwrap();
            let mut out = vec![0f32; transform.sample_len()];
            transform.apply(&bytes, &mut SampleRng::new(4, 0, "f"), &mut out).unwrap();
            out
        };
        let (plain, flipped) = (run(0.0), run(1.0));
        for (row_plain, row_flipped) in plain.chunks(32).zip(flipped.chunks(32)) {
            let reversed: Vec<f32> = row_plain.iter().rev().copied().collect();
            assert_eq!(reversed, row_flipped);
        }
    }

    #[test]
    fn dct_downscale_is_used_for_large_images_and_stays_close() {
        // 1600x1200 with a crop forced to the whole image: 1200 / 224 ≥ 4, so a 1/4 decode.
        let bytes = encode_jpeg(&synthetic_rgb(1600, 1200), 90);
        let run = |dct| {
            let mut config = TrainConfig::imagenet(224);
            config.crop = RandomResizedCrop::new((1.0, 1.0), (4.0 / 3.0, 4.0 / 3.0)).unwrap();
            config.flip_probability = 0.0;
            config.dct_downscale = dct;
            let transform = TrainTransform::new(config).unwrap();
            let mut out = vec![0f32; transform.sample_len()];
            transform.apply(&bytes, &mut SampleRng::new(0, 0, "big"), &mut out).unwrap();
            out
        };
        let header = probe(&bytes).unwrap();
        let crop = RandomResizedCrop::new((1.0, 1.0), (4.0 / 3.0, 4.0 / 3.0)).unwrap().sample(
            header.width,
            header.height,
            &mut SampleRng::new(0, 0, "big"),
        );
        assert_eq!(crop, CropBox { left: 0, top: 0, width: 1600, height: 1200 });
        assert_eq!(paying_reduction(crop.width, crop.height, 224, 224), 4);
        let (scaled, full) = (run(true), run(false));
        // Compare in 8-bit units: normalised difference times std times 255.
        let mean_abs: f64 = scaled.iter().zip(&full).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
            / full.len() as f64
            * 0.226
            * 255.0;
        assert!(mean_abs < 1.5, "DCT-scaled pipeline differs by {mean_abs} grey levels on average");
        assert_ne!(scaled, full);
    }

    #[test]
    fn grey_input_either_replicated_or_native() {
        let grey = synthetic_rgb(120, 90).to_grey();
        let bytes = encode_jpeg(&grey, 95);
        let mut config = TrainConfig::imagenet(32);
        config.normalization = Normalization::FASHION_MNIST;
        let rgb = TrainTransform::new(config.clone()).unwrap();
        let mut three = vec![0f32; rgb.sample_len()];
        rgb.apply(&bytes, &mut SampleRng::new(1, 1, "g"), &mut three).unwrap();
        assert_eq!(three.len(), 3 * 32 * 32);
        assert_eq!(three[..1024], three[1024..2048]);
        assert_eq!(three[..1024], three[2048..]);

        config.channels = ChannelPolicy::Grey;
        let native = TrainTransform::new(config.clone()).unwrap();
        let mut one = vec![0f32; native.sample_len()];
        native.apply(&bytes, &mut SampleRng::new(1, 1, "g"), &mut one).unwrap();
        assert_eq!(one[..], three[..1024]);

        // A colour image asked for as grey becomes luma of the resized crop.
        let colour = encode_jpeg(&synthetic_rgb(120, 90), 95);
        native.apply(&colour, &mut SampleRng::new(1, 1, "g"), &mut one).unwrap();
        assert!(one.iter().all(|v| v.is_finite()));
        assert!(one.iter().any(|&v| v != one[0]));
    }

    #[test]
    fn rand_augment_is_applied_deterministically() {
        let mut config = TrainConfig::imagenet(32);
        let bytes = jpeg_500x375();
        let plain = TrainTransform::new(config.clone()).unwrap();
        config.rand_augment = Some(RandAugment::new(2, 20).unwrap());
        let augmented = TrainTransform::new(config).unwrap();
        let run = |t: &TrainTransform, seed| {
            let mut out = vec![0f32; t.sample_len()];
            t.apply(&bytes, &mut SampleRng::new(seed, 0, "ra"), &mut out).unwrap();
            out
        };
        let changed = (0..20).filter(|&seed| run(&plain, seed) != run(&augmented, seed)).count();
        assert!(changed >= 15, "RandAugment changed only {changed} of 20 samples");
        assert_eq!(run(&augmented, 3), run(&augmented, 3));
    }

    #[test]
    fn eval_matches_resize_then_centre_crop() {
        let bytes = jpeg_500x375();
        let transform = EvalTransform::new(EvalConfig::imagenet(224)).unwrap();
        let mut out = vec![0f32; transform.sample_len()];
        transform.apply(&bytes, &mut out).unwrap();
        // Reference: full resize to 341x256, then the 224 crop at (58, 16).
        let decoded = crate::decode::decode(&bytes).unwrap();
        let resized =
            resize_region(&decoded, Region { left: 0.0, top: 0.0, width: 500.0, height: 375.0 }, 341, 256)
                .unwrap();
        let mut cropped = Vec::new();
        for y in 16..240 {
            for x in 58..282 {
                cropped.extend_from_slice(resized.pixel(x, y));
            }
        }
        let cropped = Image { width: 224, height: 224, channels: 3, data: cropped };
        let mut expected = vec![0f32; out.len()];
        normalize(&cropped, &Normalization::IMAGENET, 3, false, &mut expected).unwrap();
        let max_diff = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // One grey level is 1 / (255 · 0.224) ≈ 0.0175 after normalisation; allow two for the
        // filter seam at the crop edge.
        assert!(max_diff <= 0.036, "max difference {max_diff}");
    }

    #[test]
    fn bad_input_and_config_are_errors() {
        let transform = TrainTransform::new(TrainConfig::imagenet(16)).unwrap();
        let mut out = vec![0f32; transform.sample_len()];
        let mut rng = SampleRng::new(0, 0, "bad");
        let bytes = jpeg_500x375();
        assert!(matches!(
            transform.apply(&bytes[..bytes.len() / 2], &mut rng, &mut out),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            transform.apply(b"not an image", &mut rng, &mut out),
            Err(Error::UnknownFormat { .. })
        ));
        assert!(matches!(transform.apply(&bytes, &mut rng, &mut out[1..]), Err(Error::SlotSize { .. })));
        let eval = EvalTransform::new(EvalConfig::imagenet(16)).unwrap();
        assert!(eval.apply(&bytes[..100], &mut out).is_err());

        let mut config = TrainConfig::imagenet(224);
        config.flip_probability = 1.5;
        assert_eq!(
            TrainTransform::new(config).unwrap_err().to_string(),
            "flip_probability must be in [0, 1], got 1.5"
        );
        assert!(TrainTransform::new(TrainConfig::imagenet(0)).is_err());
        let mut eval_config = EvalConfig::imagenet(224);
        eval_config.crop_pct = 0.0;
        assert!(EvalTransform::new(eval_config).is_err());
    }
}
