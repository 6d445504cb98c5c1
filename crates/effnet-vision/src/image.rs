//! The decoded image: 8-bit, interleaved (HWC), one or three channels.

/// An 8-bit image, rows top to bottom, channels interleaved (HWC: `data[(y * width + x) * channels + c]`).
///
/// `channels` is 1 (grey) or 3 (RGB); decoders convert everything else (RGBA, palette, 16-bit, CMYK)
/// into one of these two, so every transform only has to handle two layouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

impl Image {
    /// An image of the given size filled with `value`.
    pub fn filled(width: u32, height: u32, channels: u8, value: u8) -> Image {
        Image {
            width,
            height,
            channels,
            data: vec![value; width as usize * height as usize * channels as usize],
        }
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.width as usize * self.channels as usize
    }

    /// The `channels` values of pixel (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> &[u8] {
        let c = self.channels as usize;
        let start = (y as usize * self.width as usize + x as usize) * c;
        &self.data[start..start + c]
    }

    /// Grey version using the ITU-R 601-2 luma weights PIL uses for `convert("L")`
    /// (`L = (299 R + 587 G + 114 B) / 1000`), so a model trained on 1-channel input sees the same
    /// values as one fed by Pillow. A grey image is returned unchanged.
    pub fn to_grey(&self) -> Image {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self.data.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect();
        Image { width: self.width, height: self.height, channels: 1, data }
    }

    /// RGB version of a grey image by replicating the channel; an RGB image is returned unchanged.
    pub fn to_rgb(&self) -> Image {
        if self.channels == 3 {
            return self.clone();
        }
        let data = self.data.iter().flat_map(|&v| [v, v, v]).collect();
        Image { width: self.width, height: self.height, channels: 3, data }
    }
}

/// PIL's integer luma: `(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16`, the fixed-point form of
/// 0.299/0.587/0.114.
#[inline]
pub(crate) fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pil_weights() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76); // 0.299 * 255 = 76.2
        assert_eq!(luma(0, 255, 0), 150); // 0.587 * 255 = 149.7
        assert_eq!(luma(0, 0, 255), 29); // 0.114 * 255 = 29.1
    }

    #[test]
    fn grey_rgb_round_trip_replicates() {
        let grey = Image { width: 2, height: 1, channels: 1, data: vec![10, 200] };
        let rgb = grey.to_rgb();
        assert_eq!(rgb.data, vec![10, 10, 10, 200, 200, 200]);
        assert_eq!(rgb.to_grey(), grey);
        assert_eq!(rgb.pixel(1, 0), &[200, 200, 200]);
    }
}
