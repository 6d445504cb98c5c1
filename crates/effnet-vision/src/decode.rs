//! JPEG and PNG decoding into [`Image`], including DCT-domain downscaled JPEG decoding.
//!
//! Two JPEG decoders, each for what it is best at (measured in `benches/pipeline.rs`, see the crate
//! docs): `zune-jpeg` for full-size decodes (the common case for ImageNet-sized photos), and
//! `jpeg-decoder` when the caller asks for a reduction, because it can run a reduced-size IDCT
//! (1/2, 1/4, 1/8) and zune-jpeg cannot. A reduced IDCT skips most of the IDCT, upsampling and colour
//! conversion work and never materialises the full-size image, which is what makes random crops of
//! large photos cheap.

use std::io::Cursor;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use crate::error::{Error, Result};
use crate::image::Image;

/// Largest accepted side in pixels. Rejecting larger headers up front keeps a corrupt or hostile
/// file from allocating gigabytes before the decoder notices the data is missing.
pub const MAX_SIDE: u32 = 1 << 14;

/// Default decoded-pixel budget (width × height), checked from the header before any pixel buffer
/// is allocated. It is Pillow's `Image.MAX_IMAGE_PIXELS` (`1024 * 1024 * 1024 // 4 // 3`, "around a
/// quarter gigabyte for a 24-bit image"), so a dataset that torchvision's loader opens also opens
/// here and one that Pillow calls a decompression bomb is refused here too. A decode then holds at
/// most ~256 MiB of RGB (~341 MiB while an RGBA PNG drops its alpha) per decode thread.
/// `MAX_SIDE` still applies to each side whatever the budget.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// The reductions a JPEG decoder can apply in the DCT domain (IDCT sizes 8, 4, 2, 1).
pub const REDUCTIONS: [u32; 4] = [1, 2, 4, 8];

/// Encoded formats recognised by their magic bytes (file names and MIME types are not trusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
}

impl ImageFormat {
    fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
        }
    }
}

/// Size and format read from the header alone, without decoding pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Recognise JPEG (`FF D8 FF`) or PNG (`89 P N G \r \n 1A \n`) from the first bytes.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(ImageFormat::Png)
    } else {
        Err(Error::UnknownFormat { magic: bytes.iter().take(8).copied().collect() })
    }
}

/// Read the format and dimensions. Cheap: only the headers are parsed, so a transform can choose
/// its crop (and with it the decode reduction) before any pixel is decoded.
pub fn probe(bytes: &[u8]) -> Result<ImageHeader> {
    let format = sniff(bytes)?;
    let (width, height) = match format {
        ImageFormat::Jpeg => {
            let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), zune_options());
            decoder.decode_headers().map_err(|e| corrupt(format, e))?;
            let info = decoder.info().ok_or_else(|| corrupt(format, "no frame header"))?;
            (info.width as u32, info.height as u32)
        }
        ImageFormat::Png => {
            let reader = png::Decoder::new(Cursor::new(bytes)).read_info().map_err(|e| corrupt(format, e))?;
            let info = reader.info();
            (info.width, info.height)
        }
    };
    check_dimensions(width, height)?;
    Ok(ImageHeader { format, width, height })
}

/// Decode a JPEG or PNG at full size. Grey stays 1 channel; RGB, RGBA (alpha dropped), palette,
/// 16-bit and CMYK become 3 or 1 channels of 8 bits. Images over [`DEFAULT_MAX_PIXELS`] are refused.
pub fn decode(bytes: &[u8]) -> Result<Image> {
    decode_within(bytes, DEFAULT_MAX_PIXELS)
}

/// [`decode`] with a decoded-pixel budget of `max_pixels` (width × height): a header claiming more
/// is refused with [`Error::TooManyPixels`] before any pixel buffer is allocated.
pub fn decode_within(bytes: &[u8], max_pixels: u64) -> Result<Image> {
    decode_planned(bytes, |_| 1, Vec::new(), max_pixels).map(|(_, image)| image)
}

/// Decode with the image reduced by `reduction` (1, 2, 4 or 8) in each dimension.
///
/// JPEGs are reduced in the DCT domain; the output is `ceil(side / reduction)` as in libjpeg. Other
/// formats (and CMYK JPEGs, which are rare enough not to deserve a second conversion path) are
/// decoded at full size, so callers must map coordinates with the returned image's size, not with
/// `reduction`.
pub fn decode_reduced(bytes: &[u8], reduction: u32) -> Result<Image> {
    check_reduction(reduction)?;
    decode_planned(bytes, |_| reduction, Vec::new(), DEFAULT_MAX_PIXELS).map(|(_, image)| image)
}

/// Decode with a reduction chosen from the header: `plan` sees the full-size dimensions (and may
/// draw the crop box from them) and returns 1, 2, 4 or 8. Headers are parsed once, which is why
/// this exists next to [`probe`] + [`decode_reduced`].
pub fn decode_for_crop(bytes: &[u8], plan: impl FnOnce(ImageHeader) -> u32) -> Result<(ImageHeader, Image)> {
    decode_planned(bytes, plan, Vec::new(), DEFAULT_MAX_PIXELS)
}

/// [`decode_for_crop`] writing into `buffer` (resized as needed) so a worker can reuse one
/// allocation for every full-size decode, within a budget of `max_pixels`. Every decode path goes
/// through here, and each checks the header's size against the budget before it allocates.
pub(crate) fn decode_planned(
    bytes: &[u8],
    plan: impl FnOnce(ImageHeader) -> u32,
    buffer: Vec<u8>,
    max_pixels: u64,
) -> Result<(ImageHeader, Image)> {
    let format = sniff(bytes)?;
    match format {
        ImageFormat::Jpeg => {
            check_jpeg_end(bytes)?;
            let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), zune_options());
            decoder.decode_headers().map_err(|e| corrupt(format, e))?;
            let info = decoder.info().ok_or_else(|| corrupt(format, "no frame header"))?;
            let header = ImageHeader { format, width: info.width as u32, height: info.height as u32 };
            check_dimensions(header.width, header.height)?;
            check_budget(header.width, header.height, max_pixels)?;
            // Every 8×8 luma block costs at least one Huffman-coded bit (arithmetic coding, which
            // could go lower, is not supported by either decoder).
            let blocks = header.width.div_ceil(8) as u64 * header.height.div_ceil(8) as u64;
            check_plausible(format, header, bytes.len(), blocks.div_ceil(8))?;
            let reduction = plan(header);
            check_reduction(reduction)?;
            if reduction > 1
                && let Some(image) = decode_jpeg_reduced(bytes, reduction, max_pixels)?
            {
                return Ok((header, image));
            }
            Ok((header, finish_jpeg(decoder, header, buffer)?))
        }
        ImageFormat::Png => {
            let mut decoder = png::Decoder::new(Cursor::new(bytes));
            decoder.set_transformations(png::Transformations::normalize_to_color8());
            let reader = decoder.read_info().map_err(|e| corrupt(format, e))?;
            let header = ImageHeader { format, width: reader.info().width, height: reader.info().height };
            check_dimensions(header.width, header.height)?;
            check_budget(header.width, header.height, max_pixels)?;
            // Deflate expands at most 1032:1 (a 258-byte match in 2 bits), so the filtered rows
            // need at least this many compressed bytes.
            let raw = reader.info().raw_row_length() as u64 * header.height as u64;
            check_plausible(format, header, bytes.len(), raw.div_ceil(1032))?;
            check_reduction(plan(header))?;
            Ok((header, finish_png(reader, header, buffer)?))
        }
    }
}

fn check_reduction(reduction: u32) -> Result<()> {
    if !REDUCTIONS.contains(&reduction) {
        return Err(Error::InvalidConfig {
            field: "reduction",
            reason: format!("must be 1, 2, 4 or 8, got {reduction}"),
        });
    }
    Ok(())
}

/// The largest reduction in [`REDUCTIONS`] that still leaves the crop at least `out_width` ×
/// `out_height` pixels, so the final resize only ever downsamples (never upsamples what the DCT
/// threw away). 1 when the crop is less than twice the output in either dimension.
pub fn reduction_for_crop(crop_width: u32, crop_height: u32, out_width: u32, out_height: u32) -> u32 {
    REDUCTIONS
        .iter()
        .copied()
        .rev()
        .find(|&r| crop_width / r >= out_width && crop_height / r >= out_height)
        .unwrap_or(1)
}

/// The smallest DCT reduction worth taking. jpeg-decoder's reduced IDCT is not SIMD and its
/// Huffman decoding is slower than zune-jpeg's, so a reduced decode only beats zune-jpeg's full
/// decode (plus the larger resize) from 1/4 on. Measured on one shared core (benches/pipeline.rs):
/// 500×375 q90 photos decode at 1170/s with zune-jpeg but 350–600/s with jpeg-decoder at 1/2 (and
/// 340–460/s at full size); 2000×1500 q90 photos at 57/s (zune-jpeg), 57–65/s (1/2), 61–70/s (1/4),
/// 63–75/s (1/8). A 1/2 decode is chosen for crops of 448–895 px, i.e. mostly for ordinary photos,
/// where it would lose 2–3×, so it is never used.
pub const MIN_PAYING_REDUCTION: u32 = 4;

/// The reduction a transform decodes with: [`reduction_for_crop`], or 1 when that is below
/// [`MIN_PAYING_REDUCTION`] (a full-size decode is faster there).
pub fn paying_reduction(crop_width: u32, crop_height: u32, out_width: u32, out_height: u32) -> u32 {
    match reduction_for_crop(crop_width, crop_height, out_width, out_height) {
        r if r >= MIN_PAYING_REDUCTION => r,
        _ => 1,
    }
}

fn zune_options() -> DecoderOptions {
    // Strict mode turns truncated or corrupt entropy-coded data into an error instead of silently
    // filling the rest of the image with grey, which would train on garbage without anyone knowing.
    DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE as usize)
        .set_max_height(MAX_SIDE as usize)
}

fn finish_jpeg(
    mut decoder: JpegDecoder<ZCursor<&[u8]>>,
    header: ImageHeader,
    mut data: Vec<u8>,
) -> Result<Image> {
    let format = ImageFormat::Jpeg;
    let (width, height) = (header.width, header.height);
    let input = decoder.input_colorspace().unwrap_or(ColorSpace::Unknown);
    let (out_space, channels) = match input {
        ColorSpace::Luma => (ColorSpace::Luma, 1u8),
        ColorSpace::YCbCr | ColorSpace::RGB | ColorSpace::CMYK | ColorSpace::YCCK => (ColorSpace::RGB, 3u8),
        other => {
            return Err(Error::Unsupported {
                format: format.name(),
                reason: format!("colour space {other:?}"),
            });
        }
    };
    decoder.set_options(zune_options().jpeg_set_out_colorspace(out_space));
    // Every byte is overwritten by the decoder; resizing a reused buffer costs nothing.
    data.resize(width as usize * height as usize * channels as usize, 0);
    decoder.decode_into(&mut data).map_err(|e| corrupt(format, e))?;
    Ok(Image { width, height, channels, data })
}

/// `None` when the image is CMYK (the caller falls back to the full-size path, which converts it).
fn decode_jpeg_reduced(bytes: &[u8], reduction: u32, max_pixels: u64) -> Result<Option<Image>> {
    let format = ImageFormat::Jpeg;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.read_info().map_err(|e| corrupt(format, e))?;
    let info = decoder.info().ok_or_else(|| corrupt(format, "no frame header"))?;
    let (width, height) = (info.width as u32, info.height as u32);
    // jpeg-decoder reads the header again on its own: check what it read, not what zune-jpeg did.
    check_dimensions(width, height)?;
    check_budget(width, height, max_pixels)?;
    let channels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::L16 => 1u8,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        jpeg_decoder::PixelFormat::CMYK32 => return Ok(None),
    };
    let requested = |side: u32| side.div_ceil(reduction).min(u16::MAX as u32) as u16;
    let (out_width, out_height) =
        decoder.scale(requested(width), requested(height)).map_err(|e| corrupt(format, e))?;
    let pixels = decoder.decode().map_err(|e| corrupt(format, e))?;
    let data = match info.pixel_format {
        // 12-bit JPEGs come out as big-endian 16-bit; keep the high byte.
        jpeg_decoder::PixelFormat::L16 => pixels.chunks_exact(2).map(|p| p[0]).collect(),
        _ => pixels,
    };
    let (width, height) = (out_width as u32, out_height as u32);
    if data.len() != width as usize * height as usize * channels as usize {
        return Err(corrupt(format, format!("decoder returned {} bytes for {width}x{height}", data.len())));
    }
    Ok(Some(Image { width, height, channels, data }))
}

fn finish_png(
    mut reader: png::Reader<Cursor<&[u8]>>,
    header: ImageHeader,
    mut buffer: Vec<u8>,
) -> Result<Image> {
    let format = ImageFormat::Png;
    let (width, height) = (header.width, header.height);
    let size = reader.output_buffer_size().ok_or_else(|| corrupt(format, "image too large"))?;
    buffer.resize(size, 0);
    let frame = reader.next_frame(&mut buffer).map_err(|e| corrupt(format, e))?;
    if frame.bit_depth != png::BitDepth::Eight {
        return Err(Error::Unsupported {
            format: format.name(),
            reason: format!("{:?} bits", frame.bit_depth),
        });
    }
    let pixels = width as usize * height as usize;
    buffer.truncate(frame.buffer_size());
    // Rows are packed (no padding) at 8 bits; alpha is dropped rather than composited, as
    // torchvision's `convert("RGB")` does.
    let (channels, data) = match frame.color_type {
        png::ColorType::Grayscale => (1u8, buffer),
        png::ColorType::GrayscaleAlpha => (1, buffer.chunks_exact(2).map(|p| p[0]).collect()),
        png::ColorType::Rgb => (3, buffer),
        png::ColorType::Rgba => (3, buffer.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect()),
        png::ColorType::Indexed => {
            return Err(Error::Unsupported { format: format.name(), reason: "palette not expanded".into() });
        }
    };
    if data.len() != pixels * channels as usize {
        return Err(corrupt(format, format!("decoder returned {} bytes for {width}x{height}", data.len())));
    }
    Ok(Image { width, height, channels, data })
}

/// A JPEG cut short loses its end-of-image marker (`FF D9`). Both decoders pad missing entropy data
/// with zeros and report success, so check for the marker near the end (a little trailing junk after
/// it is common and allowed). Inside entropy-coded data `FF` is always followed by `00` or a restart
/// marker, so `FF D9` there is a real marker. Pillow refuses such files too ("image file is truncated").
fn check_jpeg_end(bytes: &[u8]) -> Result<()> {
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    if tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(corrupt(ImageFormat::Jpeg, "no end-of-image marker (truncated file?)"))
    }
}

fn check_dimensions(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::BadDimensions { width, height, max: MAX_SIDE });
    }
    Ok(())
}

/// Refuse a header claiming more than `max_pixels`, before anything of its size is allocated: a
/// 270-byte PNG can claim 16384×16384 and the decoder's output buffer would be zero-filled (0.8 GiB)
/// before the missing data was noticed.
fn check_budget(width: u32, height: u32, max_pixels: u64) -> Result<()> {
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(Error::TooManyPixels { width, height, pixels, max_pixels });
    }
    Ok(())
}

/// Refuse a header whose size the file is too short to encode at all: the decoders would allocate
/// the claimed size and then either fail or (zune-jpeg, even in strict mode) return an image that is
/// mostly padding. Catches size lies cheaply before the allocation; smaller lies still decode.
fn check_plausible(format: ImageFormat, header: ImageHeader, len: usize, least: u64) -> Result<()> {
    if (len as u64) < least {
        return Err(corrupt(
            format,
            format!(
                "header claims {}x{} but the file's {len} bytes cannot encode it (at least {least} needed; truncated or forged?)",
                header.width, header.height
            ),
        ));
    }
    Ok(())
}

fn corrupt(format: ImageFormat, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt { format: format.name(), reason: reason.to_string() }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A smooth synthetic photo-like RGB image: gradients plus a few sinusoids, so JPEG compresses
    /// it realistically and resampling errors show.
    pub(crate) fn synthetic_rgb(width: u32, height: u32) -> Image {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let fx = x as f32 / width as f32;
                let fy = y as f32 / height as f32;
                let r = 255.0 * fx;
                let g = 255.0 * fy;
                let b = 127.5 + 100.0 * ((fx * 9.0).sin() * (fy * 7.0).cos());
                data.extend([r as u8, g as u8, b.clamp(0.0, 255.0) as u8]);
            }
        }
        Image { width, height, channels: 3, data }
    }

    pub(crate) fn encode_jpeg(image: &Image, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let color = if image.channels == 1 {
            ::image::ExtendedColorType::L8
        } else {
            ::image::ExtendedColorType::Rgb8
        };
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode(&image.data, image.width, image.height, color)
            .expect("encode jpeg");
        out
    }

    pub(crate) fn encode_png(
        data: &[u8],
        width: u32,
        height: u32,
        color: ::image::ExtendedColorType,
    ) -> Vec<u8> {
        use ::image::ImageEncoder;
        let mut out = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut out)
            .write_image(data, width, height, color)
            .expect("encode png");
        out
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn sniff_recognises_magic_and_rejects_other_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]).unwrap(), ImageFormat::Jpeg);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n....").unwrap(), ImageFormat::Png);
        let err = sniff(b"GIF89a").unwrap_err();
        assert!(matches!(err, Error::UnknownFormat { .. }));
        assert!(err.to_string().contains("47, 49, 46"), "{err}");
        assert!(sniff(&[]).is_err());
    }

    #[test]
    fn jpeg_round_trip_is_close_and_probe_matches() {
        let source = synthetic_rgb(97, 61);
        let bytes = encode_jpeg(&source, 95);
        let header = probe(&bytes).unwrap();
        assert_eq!(header, ImageHeader { format: ImageFormat::Jpeg, width: 97, height: 61 });
        let decoded = decode(&bytes).unwrap();
        assert_eq!((decoded.width, decoded.height, decoded.channels), (97, 61, 3));
        let diff = mean_abs_diff(&decoded.data, &source.data);
        assert!(diff < 3.0, "quality-95 JPEG differs by {diff} on average");
    }

    #[test]
    fn grey_jpeg_stays_one_channel() {
        let grey = synthetic_rgb(40, 30).to_grey();
        let decoded = decode(&encode_jpeg(&grey, 95)).unwrap();
        assert_eq!(decoded.channels, 1);
        assert!(mean_abs_diff(&decoded.data, &grey.data) < 3.0);
        let reduced = decode_reduced(&encode_jpeg(&grey, 95), 2).unwrap();
        assert_eq!((reduced.width, reduced.height, reduced.channels), (20, 15, 1));
    }

    #[test]
    fn png_colour_types_become_eight_bit_grey_or_rgb() {
        use ::image::ExtendedColorType as C;
        let rgba = [10u8, 20, 30, 255, 40, 50, 60, 0];
        let image = decode(&encode_png(&rgba, 2, 1, C::Rgba8)).unwrap();
        assert_eq!(image, Image { width: 2, height: 1, channels: 3, data: vec![10, 20, 30, 40, 50, 60] });

        let grey = decode(&encode_png(&[0, 128, 255], 3, 1, C::L8)).unwrap();
        assert_eq!(grey, Image { width: 3, height: 1, channels: 1, data: vec![0, 128, 255] });

        // 16-bit grey (the encoder takes native-endian u16): 0x1234 keeps the high byte 0x12.
        let samples: Vec<u8> = [0x1234u16, 0xFFFF].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let deep = decode(&encode_png(&samples, 2, 1, C::L16)).unwrap();
        assert_eq!(deep.data, vec![0x12, 0xFF]);

        let grey_alpha = decode(&encode_png(&[7, 0, 9, 255], 2, 1, C::La8)).unwrap();
        assert_eq!(grey_alpha.data, vec![7, 9]);
        assert_eq!(probe(&encode_png(&[7, 0, 9, 255], 2, 1, C::La8)).unwrap().width, 2);
    }

    /// A 16x8 CMYK JPEG written by Pillow (`convert("CMYK").save(quality=95)`): left half RGB
    /// (200, 40, 40), right half (40, 40, 200).
    const CMYK_JPEG: &[u8] = &[
        0xff, 0xd8, 0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00,
        0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02, 0x01, 0x01, 0x01, 0x02,
        0x02, 0x02, 0x02, 0x02, 0x04, 0x03, 0x02, 0x02, 0x02, 0x02, 0x05, 0x04, 0x04, 0x03, 0x04, 0x06, 0x05,
        0x06, 0x06, 0x06, 0x05, 0x06, 0x06, 0x06, 0x07, 0x09, 0x08, 0x06, 0x07, 0x09, 0x07, 0x06, 0x06, 0x08,
        0x0b, 0x08, 0x09, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x06, 0x08, 0x0b, 0x0c, 0x0b, 0x0a, 0x0c, 0x09, 0x0a,
        0x0a, 0x0a, 0xff, 0xc0, 0x00, 0x14, 0x08, 0x00, 0x08, 0x00, 0x10, 0x04, 0x43, 0x11, 0x00, 0x4d, 0x11,
        0x00, 0x59, 0x11, 0x00, 0x4b, 0x11, 0x00, 0xff, 0xc4, 0x00, 0x1f, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01,
        0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05,
        0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff, 0xc4, 0x00, 0xb5, 0x10, 0x00, 0x02, 0x01, 0x03, 0x03, 0x02,
        0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7d, 0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05,
        0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08,
        0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17,
        0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43,
        0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85,
        0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4,
        0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
        0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1,
        0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
        0xf9, 0xfa, 0xff, 0xda, 0x00, 0x0e, 0x04, 0x43, 0x00, 0x4d, 0x00, 0x59, 0x00, 0x4b, 0x00, 0x00, 0x3f,
        0x00, 0xfd, 0x20, 0xaf, 0xc9, 0xfa, 0xfc, 0x9f, 0xaf, 0xdf, 0xca, 0xfe, 0x5f, 0xe8, 0xaf, 0xea, 0x02,
        0x8a, 0xff, 0xd9,
    ];

    #[test]
    fn cmyk_jpeg_is_converted_to_rgb() {
        for image in [decode(CMYK_JPEG).unwrap(), decode_reduced(CMYK_JPEG, 4).unwrap()] {
            // The reduced path falls back to a full-size decode for CMYK.
            assert_eq!((image.width, image.height, image.channels), (16, 8, 3));
            let close =
                |p: &[u8], want: [u8; 3]| p.iter().zip(want).all(|(&a, b)| (a as i32 - b as i32).abs() <= 12);
            assert!(close(image.pixel(2, 2), [200, 40, 40]), "{:?}", image.pixel(2, 2));
            assert!(close(image.pixel(13, 5), [40, 40, 200]), "{:?}", image.pixel(13, 5));
        }
    }

    #[test]
    fn truncated_and_random_data_error_without_panicking() {
        let jpeg = encode_jpeg(&synthetic_rgb(64, 48), 90);
        let png = encode_png(&synthetic_rgb(64, 48).data, 64, 48, ::image::ExtendedColorType::Rgb8);
        for bytes in [&jpeg, &png] {
            for cut in [3, 20, bytes.len() / 3, bytes.len() / 2, bytes.len() - 10] {
                let truncated = &bytes[..cut];
                assert!(
                    decode(truncated).is_err(),
                    "decode accepted {cut} of {} bytes {:?}",
                    bytes.len(),
                    sniff(bytes)
                );
                assert!(decode_reduced(truncated, 2).is_err(), "reduced decode accepted {cut} bytes");
            }
        }
        // Random bytes behind a valid magic exercise the parsers, not just the sniffer.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for trial in 0..200 {
            let mut bytes: Vec<u8> = (0..512)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let magic: &[u8] = if trial % 2 == 0 { &[0xFF, 0xD8, 0xFF] } else { b"\x89PNG\r\n\x1a\n" };
            bytes[..magic.len()].copy_from_slice(magic);
            assert!(decode(&bytes).is_err());
            assert!(decode_reduced(&bytes, 4).is_err());
        }
    }

    /// A grey PNG whose header claims `width`×`height` but whose pixel data holds `rows` rows: the
    /// "small file, huge header" bomb. A real `width`×`rows` PNG with the IHDR height (and CRC)
    /// rewritten, so everything before the missing data parses.
    pub(crate) fn forged_png(width: u32, height: u32, rows: u32) -> Vec<u8> {
        let zeros = vec![0u8; width as usize * rows as usize];
        let mut bytes = encode_png(&zeros, width, rows, ::image::ExtendedColorType::L8);
        // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4) ... CRC after 13 bytes.
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    /// CRC-32 (IEEE, as PNG chunks use), bit by bit: only test inputs of a few bytes go through it.
    pub(crate) fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A JPEG whose frame header (SOF0) claims `width`×`height`: a real small JPEG with the two
    /// size fields rewritten, so everything else parses.
    pub(crate) fn forged_jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = encode_jpeg(&synthetic_rgb(16, 16), 90);
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
        bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        bytes
    }

    #[test]
    fn headers_over_the_pixel_budget_are_refused_by_every_decode_path() {
        let png_bomb = forged_png(16384, 16384, 2);
        assert!(png_bomb.len() < 400, "the bomb is {} bytes", png_bomb.len());
        assert_eq!(
            probe(&png_bomb).unwrap(),
            ImageHeader { format: ImageFormat::Png, width: 16384, height: 16384 }
        );
        let jpeg_bomb = forged_jpeg(16000, 16000);
        assert_eq!(probe(&jpeg_bomb).unwrap().width, 16000);
        let expect_refusal = |result: Result<Image>, width: u32, height: u32| match result {
            Err(Error::TooManyPixels { width: w, height: h, pixels, max_pixels }) => {
                assert_eq!(
                    (w, h, pixels, max_pixels),
                    (width, height, width as u64 * height as u64, DEFAULT_MAX_PIXELS)
                );
            }
            other => panic!("expected TooManyPixels, got {other:?}"),
        };
        expect_refusal(decode(&png_bomb), 16384, 16384);
        expect_refusal(decode_reduced(&png_bomb, 8), 16384, 16384);
        expect_refusal(decode(&jpeg_bomb), 16000, 16000);
        // The DCT-reduced path (jpeg-decoder) would only need 1/64 of the pixels, but the budget is
        // on what the header claims, as Pillow's is.
        expect_refusal(decode_reduced(&jpeg_bomb, 8), 16000, 16000);
        expect_refusal(decode_for_crop(&jpeg_bomb, |_| 4).map(|(_, image)| image), 16000, 16000);
        let message = decode(&png_bomb).unwrap_err().to_string();
        assert!(message.contains("16384x16384 = 268435456 pixels"), "{message}");
        assert!(message.contains("budget of 89478485"), "{message}");
    }

    #[test]
    fn sizes_the_file_cannot_encode_are_refused_before_decoding() {
        // A real 16×16 JPEG claiming 9459×9459 used to decode "successfully" into 268 MB of
        // padding (zune-jpeg pads missing MCUs even in strict mode); found by tests/fuzz_decode.rs.
        let jpeg = forged_jpeg(9459, 9459);
        let message = decode(&jpeg).unwrap_err().to_string();
        let least = 1183u64 * 1183 / 8 + 1; // ceil(1183² bits / 8)
        assert!(
            message.contains(&format!("header claims 9459x9459 but the file's {} bytes", jpeg.len())),
            "{message}"
        );
        assert!(message.contains(&format!("at least {least} needed")), "{message}");
        let png = forged_png(9000, 9000, 2);
        let message = decode(&png).unwrap_err().to_string();
        assert!(message.contains("at least 78498 needed"), "{message}"); // ceil(9000 × 9001 / 1032)
        // Honest files pass: a flat 3000×3000 grey PNG compresses to ~9 KB, above its 8.7 KB floor.
        let flat = encode_png(&vec![0; 3000 * 3000], 3000, 3000, ::image::ExtendedColorType::L8);
        assert_eq!(decode(&flat).unwrap().width, 3000, "{} bytes", flat.len());
    }

    #[test]
    fn the_budget_is_configurable_and_inclusive() {
        let image = synthetic_rgb(40, 30);
        let jpeg = encode_jpeg(&image, 90);
        let png = encode_png(&image.data, 40, 30, ::image::ExtendedColorType::Rgb8);
        for bytes in [&jpeg, &png] {
            assert_eq!(decode_within(bytes, 1200).unwrap().width, 40, "exactly at the budget decodes");
            match decode_within(bytes, 1199) {
                Err(Error::TooManyPixels { pixels: 1200, max_pixels: 1199, .. }) => {}
                other => panic!("expected a refusal at 1199 pixels, got {other:?}"),
            }
        }
        // A forged header under a raised budget gets past the budget and fails on the missing data.
        let err = decode_within(&forged_png(3000, 3000, 2), 10_000_000).unwrap_err();
        assert!(matches!(err, Error::Corrupt { format: "PNG", .. }), "{err}");
    }

    #[test]
    fn reduction_is_the_largest_power_of_two_keeping_the_output_size() {
        assert_eq!(reduction_for_crop(500, 375, 224, 224), 1);
        assert_eq!(reduction_for_crop(448, 448, 224, 224), 2);
        assert_eq!(reduction_for_crop(447, 1000, 224, 224), 1);
        assert_eq!(reduction_for_crop(1000, 900, 224, 224), 4);
        assert_eq!(reduction_for_crop(4000, 3000, 224, 224), 8);
        assert_eq!(reduction_for_crop(100, 100, 224, 224), 1);
        assert_eq!(paying_reduction(448, 448, 224, 224), 1);
        assert_eq!(paying_reduction(900, 1000, 224, 224), 4);
        assert_eq!(paying_reduction(1800, 2000, 224, 224), 8);
        assert!(decode_reduced(&[0xFF, 0xD8, 0xFF], 3).is_err());
    }

    #[test]
    fn decode_for_crop_plans_from_the_full_size_header() {
        let bytes = encode_jpeg(&synthetic_rgb(1000, 900), 90);
        let (header, image) = decode_for_crop(&bytes, |h| {
            assert_eq!((h.width, h.height), (1000, 900));
            paying_reduction(h.width, h.height, 224, 224)
        })
        .unwrap();
        assert_eq!(header, ImageHeader { format: ImageFormat::Jpeg, width: 1000, height: 900 });
        assert_eq!((image.width, image.height), (250, 225)); // 900 / 4 = 225 ≥ 224 → 1/4
        assert!(decode_for_crop(&bytes, |_| 3).is_err());
        let png = encode_png(&[1, 2, 3, 4], 2, 2, ::image::ExtendedColorType::L8);
        let (header, image) = decode_for_crop(&png, |_| 8).unwrap();
        assert_eq!((header.format, image.width, image.data.clone()), (ImageFormat::Png, 2, vec![1, 2, 3, 4]));
    }

    #[test]
    fn reduced_decode_matches_full_decode_then_box_downscale() {
        let source = synthetic_rgb(400, 320);
        let bytes = encode_jpeg(&source, 92);
        let full = decode(&bytes).unwrap();
        for reduction in [2u32, 4, 8] {
            let reduced = decode_reduced(&bytes, reduction).unwrap();
            assert_eq!((reduced.width, reduced.height), (400 / reduction, 320 / reduction));
            // Reference: average each reduction x reduction block of the full decode, which is
            // what a reduced IDCT approximates (it keeps the low-frequency coefficients).
            let r = reduction as usize;
            let mut reference = Vec::with_capacity(reduced.data.len());
            for y in 0..reduced.height as usize {
                for x in 0..reduced.width as usize {
                    for c in 0..3 {
                        let mut sum = 0u32;
                        for dy in 0..r {
                            for dx in 0..r {
                                sum += full.data[((y * r + dy) * 400 + x * r + dx) * 3 + c] as u32;
                            }
                        }
                        reference.push((sum as f32 / (r * r) as f32).round() as u8);
                    }
                }
            }
            let diff = mean_abs_diff(&reduced.data, &reference);
            assert!(diff < 2.0, "1/{reduction} decode differs from the box-filtered full decode by {diff}");
        }
    }
}
