//! RandAugment (Cubuk et al., arXiv 1909.13719) with torchvision's op set and magnitude table.
//!
//! Each sample gets `num_ops` ops drawn uniformly (with replacement) from 14; every op's strength
//! comes from one global magnitude `m` in 0..=30 (torchvision's 31 bins), with a random sign for the
//! symmetric ops. Ops work on 8-bit images in place of PIL; geometric ops use nearest-neighbour
//! sampling and fill uncovered pixels with 0, as torchvision's defaults do. Values match PIL/
//! torchvision closely but not bit for bit (rounding of blends differs by at most one level).

use crate::error::{Error, Result};
use crate::image::Image;
use crate::rng::SampleRng;

/// The number of magnitude bins; magnitudes run 0..=MAX_MAGNITUDE.
pub const MAX_MAGNITUDE: u32 = 30;

/// One RandAugment operation with its resolved strength.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AugmentOp {
    Identity,
    /// Horizontal shear: source x = x + shear · y.
    ShearX(f64),
    ShearY(f64),
    /// Shift by whole pixels (positive moves content right / down).
    TranslateX(i32),
    TranslateY(i32),
    /// Counter-clockwise rotation about the centre, in degrees.
    Rotate(f64),
    /// Enhancement factors: 1 is identity, 0 gives the degenerate image (black, grey, mean, blurred).
    Brightness(f64),
    Color(f64),
    Contrast(f64),
    Sharpness(f64),
    /// Keep this many high bits of every value.
    Posterize(u8),
    /// Invert values at or above this threshold.
    Solarize(f64),
    AutoContrast,
    Equalize,
}

/// RandAugment configuration: `num_ops` ops per sample at magnitude `magnitude`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandAugment {
    pub num_ops: u32,
    pub magnitude: u32,
}

impl Default for RandAugment {
    /// torchvision's defaults: 2 ops at magnitude 9.
    fn default() -> Self {
        RandAugment { num_ops: 2, magnitude: 9 }
    }
}

impl RandAugment {
    /// Checked constructor: magnitude in 0..=30.
    pub fn new(num_ops: u32, magnitude: u32) -> Result<Self> {
        if magnitude > MAX_MAGNITUDE {
            return Err(Error::InvalidConfig {
                field: "rand_augment.magnitude",
                reason: format!("must be in 0..={MAX_MAGNITUDE}, got {magnitude}"),
            });
        }
        Ok(RandAugment { num_ops, magnitude })
    }

    /// Draw the ops for one sample of a `width` × `height` image (translation is relative to size).
    pub fn sample_ops(&self, width: u32, height: u32, rng: &mut SampleRng) -> Vec<AugmentOp> {
        let fraction = self.magnitude as f64 / MAX_MAGNITUDE as f64;
        (0..self.num_ops)
            .map(|_| {
                let index = rng.below(14);
                let sign = if index <= 9 && rng.chance(0.5) { -1.0 } else { 1.0 };
                match index {
                    0 => AugmentOp::Identity,
                    1 => AugmentOp::ShearX(sign * 0.3 * fraction),
                    2 => AugmentOp::ShearY(sign * 0.3 * fraction),
                    3 => AugmentOp::TranslateX((sign * 150.0 / 331.0 * width as f64 * fraction) as i32),
                    4 => AugmentOp::TranslateY((sign * 150.0 / 331.0 * height as f64 * fraction) as i32),
                    5 => AugmentOp::Rotate(sign * 30.0 * fraction),
                    6 => AugmentOp::Brightness(1.0 + sign * 0.9 * fraction),
                    7 => AugmentOp::Color(1.0 + sign * 0.9 * fraction),
                    8 => AugmentOp::Contrast(1.0 + sign * 0.9 * fraction),
                    9 => AugmentOp::Sharpness(1.0 + sign * 0.9 * fraction),
                    10 => AugmentOp::Posterize(8 - (self.magnitude as f64 / 7.5).round_ties_even() as u8),
                    11 => AugmentOp::Solarize(255.0 * (1.0 - fraction)),
                    12 => AugmentOp::AutoContrast,
                    _ => AugmentOp::Equalize,
                }
            })
            .collect()
    }

    /// Apply `num_ops` randomly drawn ops to `image`.
    pub fn apply(&self, image: Image, rng: &mut SampleRng) -> Image {
        let ops = self.sample_ops(image.width, image.height, rng);
        ops.iter().fold(image, |image, op| op.apply(&image))
    }
}

impl AugmentOp {
    /// The op applied to `image`, returning a new image of the same size and channels.
    pub fn apply(&self, image: &Image) -> Image {
        match *self {
            AugmentOp::Identity => image.clone(),
            AugmentOp::ShearX(s) => affine_nearest(image, [1.0, s, 0.0, 0.0, 1.0, 0.0]),
            AugmentOp::ShearY(s) => affine_nearest(image, [1.0, 0.0, 0.0, s, 1.0, 0.0]),
            AugmentOp::TranslateX(t) => affine_nearest(image, [1.0, 0.0, -t as f64, 0.0, 1.0, 0.0]),
            AugmentOp::TranslateY(t) => affine_nearest(image, [1.0, 0.0, 0.0, 0.0, 1.0, -t as f64]),
            AugmentOp::Rotate(degrees) => rotate(image, degrees),
            AugmentOp::Brightness(f) => {
                blend(image, &Image::filled(image.width, image.height, image.channels, 0), f)
            }
            AugmentOp::Color(f) => blend(image, &grey_like(image), f),
            AugmentOp::Contrast(f) => {
                let grey = grey_like(image);
                let sum: u64 = grey.data.iter().step_by(image.channels as usize).map(|&v| v as u64).sum();
                let mean = (sum as f64 / (image.width as f64 * image.height as f64) + 0.5) as u8;
                blend(image, &Image::filled(image.width, image.height, image.channels, mean), f)
            }
            AugmentOp::Sharpness(f) => blend(image, &smooth(image), f),
            AugmentOp::Posterize(bits) => {
                let mask = !(((1u16 << (8 - bits.clamp(1, 8))) - 1) as u8);
                map_values(image, |v| v & mask)
            }
            AugmentOp::Solarize(threshold) => {
                map_values(image, |v| if v as f64 >= threshold { 255 - v } else { v })
            }
            AugmentOp::AutoContrast => per_channel_lut(image, autocontrast_lut),
            AugmentOp::Equalize => per_channel_lut(image, equalize_lut),
        }
    }
}

/// Inverse-mapped affine warp: output pixel (x, y) samples source
/// (`a·x + b·y + c`, `d·x + e·y + f`) at pixel centres, nearest neighbour, 0 outside.
fn affine_nearest(image: &Image, [a, b, c, d, e, f]: [f64; 6]) -> Image {
    let channels = image.channels as usize;
    let mut out = Image::filled(image.width, image.height, image.channels, 0);
    let (w, h) = (image.width as f64, image.height as f64);
    for y in 0..image.height as usize {
        let yc = y as f64 + 0.5;
        for x in 0..image.width as usize {
            let xc = x as f64 + 0.5;
            let sx = a * xc + b * yc + c;
            let sy = d * xc + e * yc + f;
            if sx >= 0.0 && sy >= 0.0 && sx < w && sy < h {
                let src = (sy as usize * image.width as usize + sx as usize) * channels;
                let dst = (y * image.width as usize + x) * channels;
                out.data[dst..dst + channels].copy_from_slice(&image.data[src..src + channels]);
            }
        }
    }
    out
}

/// Rotate counter-clockwise by `degrees` about the image centre (PIL convention).
pub fn rotate(image: &Image, degrees: f64) -> Image {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (image.width as f64 / 2.0, image.height as f64 / 2.0);
    // Inverse map: rotate the output point back by the angle. With y pointing down, a visual
    // counter-clockwise turn is the matrix [cos, sin; -sin, cos] applied to (x - cx, y - cy).
    let (a, b, d, e) = (cos, -sin, sin, cos);
    affine_nearest(image, [a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy])
}

/// `degenerate + factor · (image − degenerate)`, clamped and truncated as torchvision's `_blend`.
fn blend(image: &Image, degenerate: &Image, factor: f64) -> Image {
    let data = image
        .data
        .iter()
        .zip(&degenerate.data)
        .map(|(&v, &d)| (d as f64 + factor * (v as f64 - d as f64)).clamp(0.0, 255.0) as u8)
        .collect();
    Image { width: image.width, height: image.height, channels: image.channels, data }
}

/// Luma of every pixel, replicated over the image's channels (a grey image is its own).
fn grey_like(image: &Image) -> Image {
    if image.channels == 1 {
        return image.clone();
    }
    image.to_grey().to_rgb()
}

/// PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior; border pixels unchanged.
fn smooth(image: &Image) -> Image {
    let mut out = image.clone();
    let (w, h, c) = (image.width as usize, image.height as usize, image.channels as usize);
    if w < 3 || h < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for ch in 0..c {
                let mut sum = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let v = image.data[((y + dy - 1) * w + x + dx - 1) * c + ch] as u32;
                        sum += if dx == 1 && dy == 1 { 5 * v } else { v };
                    }
                }
                out.data[(y * w + x) * c + ch] = ((sum + 6) / 13) as u8;
            }
        }
    }
    out
}

fn map_values(image: &Image, f: impl Fn(u8) -> u8) -> Image {
    let mut lut = [0u8; 256];
    for (v, entry) in lut.iter_mut().enumerate() {
        *entry = f(v as u8);
    }
    Image {
        width: image.width,
        height: image.height,
        channels: image.channels,
        data: image.data.iter().map(|&v| lut[v as usize]).collect(),
    }
}

fn per_channel_lut(image: &Image, make_lut: fn(&[u32; 256]) -> [u8; 256]) -> Image {
    let channels = image.channels as usize;
    let mut out = image.clone();
    for c in 0..channels {
        let mut histogram = [0u32; 256];
        for &v in image.data.iter().skip(c).step_by(channels) {
            histogram[v as usize] += 1;
        }
        let lut = make_lut(&histogram);
        for v in out.data.iter_mut().skip(c).step_by(channels) {
            *v = lut[*v as usize];
        }
    }
    out
}

/// Stretch [min, max] to [0, 255]; a constant channel is left alone (torchvision).
fn autocontrast_lut(histogram: &[u32; 256]) -> [u8; 256] {
    let mut lut = [0u8; 256];
    let min = histogram.iter().position(|&n| n > 0).unwrap_or(0);
    let max = histogram.iter().rposition(|&n| n > 0).unwrap_or(255);
    for (v, entry) in lut.iter_mut().enumerate() {
        // Integer arithmetic so the maximum lands on exactly 255 (in floats 100 · 2.55 = 254.99…).
        *entry = if max > min { ((v.clamp(min, max) - min) * 255 / (max - min)) as u8 } else { v as u8 };
    }
    lut
}

/// PIL's `ImageOps.equalize`: spread the cumulative histogram over 0..255, ignoring the last
/// (brightest) bin's count so a single bright spike does not compress everything else.
fn equalize_lut(histogram: &[u32; 256]) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (v, entry) in lut.iter_mut().enumerate() {
        *entry = v as u8;
    }
    let last_nonzero = histogram.iter().rposition(|&n| n > 0).map_or(0, |i| histogram[i]);
    let total: u32 = histogram.iter().sum();
    let step = (total - last_nonzero) / 255;
    if step == 0 {
        return lut;
    }
    let mut running = step / 2;
    for (v, entry) in lut.iter_mut().enumerate() {
        *entry = (running / step).min(255) as u8;
        running += histogram[v];
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::synthetic_rgb;

    fn picture() -> Image {
        synthetic_rgb(37, 23)
    }

    #[test]
    fn identity_and_zero_strength_ops_change_nothing() {
        let image = picture();
        for op in [
            AugmentOp::Identity,
            AugmentOp::ShearX(0.0),
            AugmentOp::ShearY(0.0),
            AugmentOp::TranslateX(0),
            AugmentOp::TranslateY(0),
            AugmentOp::Rotate(0.0),
            AugmentOp::Brightness(1.0),
            AugmentOp::Color(1.0),
            AugmentOp::Contrast(1.0),
            AugmentOp::Sharpness(1.0),
            AugmentOp::Posterize(8),
            AugmentOp::Solarize(256.0),
        ] {
            assert_eq!(op.apply(&image), image, "{op:?}");
        }
        // Magnitude 0 resolves every op to its identity (posterize 8 bits, solarize at 255 only
        // touches value 255, which the synthetic picture lacks in blue).
        let ra = RandAugment::new(3, 0).unwrap();
        for seed in 0..50 {
            for op in ra.sample_ops(37, 23, &mut SampleRng::new(seed, 0, "m0")) {
                match op {
                    AugmentOp::Solarize(t) => assert_eq!(t, 255.0),
                    AugmentOp::AutoContrast | AugmentOp::Equalize => {}
                    other => assert_eq!(other.apply(&image), image, "{other:?}"),
                }
            }
        }
    }

    #[test]
    fn solarize_inverts_values_at_or_above_threshold() {
        let image = Image { width: 4, height: 1, channels: 1, data: vec![0, 99, 100, 250] };
        assert_eq!(AugmentOp::Solarize(100.0).apply(&image).data, vec![0, 99, 155, 5]);
    }

    #[test]
    fn posterize_keeps_the_top_bits() {
        let image = Image { width: 3, height: 1, channels: 1, data: vec![0b1011_0111, 255, 15] };
        assert_eq!(AugmentOp::Posterize(4).apply(&image).data, vec![0b1011_0000, 0b1111_0000, 0]);
        assert_eq!(AugmentOp::Posterize(1).apply(&image).data, vec![0b1000_0000, 0b1000_0000, 0]);
    }

    #[test]
    fn equalize_flattens_a_histogram() {
        // 4096 pixels squeezed into values 100..=115 (256 each) spread over the full range.
        let data: Vec<u8> = (0..4096).map(|i| 100 + (i / 256) as u8).collect();
        let image = Image { width: 64, height: 64, channels: 1, data };
        let out = AugmentOp::Equalize.apply(&image);
        let distinct: std::collections::BTreeSet<u8> = out.data.iter().copied().collect();
        assert_eq!(distinct.len(), 16);
        assert_eq!(*distinct.first().unwrap(), 0);
        assert!(*distinct.last().unwrap() >= 230, "{distinct:?}");
        // Equal counts in → equally spaced levels out (PIL: step = (4096 - 256) / 255 = 15, levels
        // 256 / 15 ≈ 17 apart).
        let gaps: Vec<i32> =
            distinct.iter().zip(distinct.iter().skip(1)).map(|(a, b)| *b as i32 - *a as i32).collect();
        assert!(gaps.iter().all(|&g| (15..=18).contains(&g)), "{gaps:?}");
        // A constant image has nothing to spread.
        let flat = Image::filled(8, 8, 3, 42);
        assert_eq!(AugmentOp::Equalize.apply(&flat), flat);
    }

    #[test]
    fn autocontrast_stretches_to_full_range() {
        let image = Image { width: 3, height: 1, channels: 1, data: vec![50, 100, 150] };
        assert_eq!(AugmentOp::AutoContrast.apply(&image).data, vec![0, 127, 255]);
        let flat = Image::filled(2, 2, 1, 9);
        assert_eq!(AugmentOp::AutoContrast.apply(&flat), flat);
    }

    #[test]
    fn enhancement_ops_blend_towards_their_degenerate_image() {
        let image = Image { width: 2, height: 1, channels: 3, data: vec![200, 100, 0, 50, 50, 50] };
        assert_eq!(AugmentOp::Brightness(0.5).apply(&image).data, vec![100, 50, 0, 25, 25, 25]);
        assert_eq!(AugmentOp::Brightness(0.0).apply(&image).data, vec![0; 6]);
        // Colour 0 is the grey image: luma(200, 100, 0) = 118.
        assert_eq!(AugmentOp::Color(0.0).apply(&image).data, vec![118, 118, 118, 50, 50, 50]);
        // Contrast 0 is the mean luma (118 + 50) / 2 = 84 everywhere.
        assert_eq!(AugmentOp::Contrast(0.0).apply(&image).data, vec![84; 6]);
        // Contrast 2 doubles the distance from the mean, clamped.
        let grey = Image { width: 2, height: 1, channels: 1, data: vec![74, 94] };
        assert_eq!(AugmentOp::Contrast(2.0).apply(&grey).data, vec![64, 104]);
        // Sharpness 0 is the smoothed image: a 3x3 spike of 130 in 0 becomes 130 * 5 / 13 = 50.
        let mut spike = Image::filled(3, 3, 1, 0);
        spike.data[4] = 130;
        assert_eq!(AugmentOp::Sharpness(0.0).apply(&spike).data[4], 50);
        assert_eq!(AugmentOp::Sharpness(2.0).apply(&spike).data[4], 210);
    }

    #[test]
    fn geometric_ops_move_pixels_as_stated() {
        let image = Image { width: 4, height: 2, channels: 1, data: vec![1, 2, 3, 4, 5, 6, 7, 8] };
        assert_eq!(AugmentOp::TranslateX(1).apply(&image).data, vec![0, 1, 2, 3, 0, 5, 6, 7]);
        assert_eq!(AugmentOp::TranslateX(-2).apply(&image).data, vec![3, 4, 0, 0, 7, 8, 0, 0]);
        assert_eq!(AugmentOp::TranslateY(1).apply(&image).data, vec![0, 0, 0, 0, 1, 2, 3, 4]);
        // 180° about the centre reverses the pixel order exactly.
        let turned = rotate(&image, 180.0);
        assert_eq!(turned.data, vec![8, 7, 6, 5, 4, 3, 2, 1]);
        // Shear 1 about the origin: row y samples x + (y + 0.5) at pixel centres (PIL's convention),
        // so row 0 moves left by one pixel and row 1 by two.
        let sheared = AugmentOp::ShearX(1.0).apply(&image);
        assert_eq!(sheared.data, vec![2, 3, 4, 0, 7, 8, 0, 0]);
        // Rotating a square by 90° counter-clockwise moves the top-right corner to the top-left.
        let square = Image { width: 2, height: 2, channels: 1, data: vec![1, 2, 3, 4] };
        assert_eq!(rotate(&square, 90.0).data, vec![2, 4, 1, 3]);
    }

    #[test]
    fn sampled_ops_follow_the_magnitude_table() {
        let ra = RandAugment::default();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..400 {
            let ops = ra.sample_ops(224, 224, &mut SampleRng::new(seed, 0, "table"));
            assert_eq!(ops.len(), 2);
            for op in ops {
                seen.insert(std::mem::discriminant(&op));
                match op {
                    AugmentOp::ShearX(s) | AugmentOp::ShearY(s) => assert!((s.abs() - 0.09).abs() < 1e-12),
                    AugmentOp::TranslateX(t) | AugmentOp::TranslateY(t) => assert_eq!(t.abs(), 30), // 150/331*224*0.3
                    AugmentOp::Rotate(d) => assert!((d.abs() - 9.0).abs() < 1e-12),
                    AugmentOp::Brightness(f)
                    | AugmentOp::Color(f)
                    | AugmentOp::Contrast(f)
                    | AugmentOp::Sharpness(f) => {
                        assert!((f - 1.27).abs() < 1e-12 || (f - 0.73).abs() < 1e-12, "{f}")
                    }
                    AugmentOp::Posterize(bits) => assert_eq!(bits, 7),
                    AugmentOp::Solarize(t) => assert!((t - 178.5).abs() < 1e-9),
                    _ => {}
                }
            }
        }
        assert_eq!(seen.len(), 14);
        assert!(RandAugment::new(2, 31).is_err());
        assert_eq!(
            RandAugment::new(2, 30).unwrap().sample_ops(10, 10, &mut SampleRng::new(0, 0, "")).len(),
            2
        );
    }

    #[test]
    fn apply_is_deterministic_per_rng_and_keeps_shape() {
        let ra = RandAugment::new(3, 15).unwrap();
        let a = ra.apply(picture(), &mut SampleRng::new(5, 2, "x"));
        let b = ra.apply(picture(), &mut SampleRng::new(5, 2, "x"));
        assert_eq!(a, b);
        assert_eq!((a.width, a.height, a.channels), (37, 23, 3));
        let grey = ra.apply(picture().to_grey(), &mut SampleRng::new(5, 2, "x"));
        assert_eq!(grey.channels, 1);
    }
}
