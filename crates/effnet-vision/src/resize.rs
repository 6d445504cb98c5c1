//! Resampling a crop region to the output size with `fast_image_resize` (SIMD convolution).
//!
//! The filter is bilinear with support widened by the downscale factor (antialiased), the same
//! scheme as PIL's `resize(BILINEAR)` that torchvision uses on PIL images, so a downscaled crop is
//! averaged over all its source pixels instead of aliasing.

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::error::{Error, Result};
use crate::geometry::Region;
use crate::image::Image;

/// Resample `region` of `source` to `width` × `height`, writing into `out` (resized to fit, so a
/// reused buffer does not reallocate).
pub(crate) fn resize_region_into(
    resizer: &mut Resizer,
    source: &Image,
    region: Region,
    width: u32,
    height: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    let pixel_type = match source.channels {
        1 => PixelType::U8,
        3 => PixelType::U8x3,
        other => return Err(Error::Resize { reason: format!("{other} channels (expected 1 or 3)") }),
    };
    let resize_error = |e: &dyn std::fmt::Display| Error::Resize { reason: e.to_string() };
    // The resizer rejects regions poking out of the image by a rounding error; clamp instead.
    let (sw, sh) = (source.width as f64, source.height as f64);
    let left = region.left.clamp(0.0, sw - 1.0);
    let top = region.top.clamp(0.0, sh - 1.0);
    let crop_width = region.width.clamp(1.0, sw - left);
    let crop_height = region.height.clamp(1.0, sh - top);
    let src =
        ImageRef::new(source.width, source.height, &source.data, pixel_type).map_err(|e| resize_error(&e))?;
    out.resize(width as usize * height as usize * source.channels as usize, 0);
    let mut dst = FirImage::from_slice_u8(width, height, out, pixel_type).map_err(|e| resize_error(&e))?;
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(
        left,
        top,
        crop_width,
        crop_height,
    );
    resizer.resize(&src, &mut dst, &options).map_err(|e| resize_error(&e))
}

/// Resample `region` of `source` to a new `width` × `height` image (convenience form of the
/// in-place path the transforms use).
pub fn resize_region(source: &Image, region: Region, width: u32, height: u32) -> Result<Image> {
    let mut data = Vec::new();
    resize_region_into(&mut Resizer::new(), source, region, width, height, &mut data)?;
    Ok(Image { width, height, channels: source.channels, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::CropBox;

    #[test]
    fn same_size_crop_copies_pixels_exactly() {
        let source = crate::decode::tests::synthetic_rgb(50, 40);
        let region = Region::from(CropBox { left: 10, top: 5, width: 20, height: 30 });
        let out = resize_region(&source, region, 20, 30).unwrap();
        for y in 0..30 {
            for x in 0..20 {
                assert_eq!(out.pixel(x, y), source.pixel(x + 10, y + 5));
            }
        }
    }

    #[test]
    fn downscale_of_constant_image_is_constant_and_halving_averages_pairs() {
        let flat = Image::filled(64, 48, 1, 77);
        let out =
            resize_region(&flat, Region { left: 0.0, top: 0.0, width: 64.0, height: 48.0 }, 7, 5).unwrap();
        assert!(out.data.iter().all(|&v| v == 77));

        // 2x1 → 1x1 averages the two pixels (bilinear at a 2x downscale is a box over the pair).
        let pair = Image { width: 2, height: 1, channels: 1, data: vec![100, 200] };
        let out =
            resize_region(&pair, Region { left: 0.0, top: 0.0, width: 2.0, height: 1.0 }, 1, 1).unwrap();
        assert_eq!(out.data, vec![150]);
    }

    #[test]
    fn out_of_bounds_region_is_clamped_not_rejected() {
        let flat = Image::filled(10, 10, 3, 9);
        let out =
            resize_region(&flat, Region { left: -0.5, top: 0.0, width: 10.7, height: 10.2 }, 4, 4).unwrap();
        assert_eq!(out.data, vec![9; 48]);
    }
}
