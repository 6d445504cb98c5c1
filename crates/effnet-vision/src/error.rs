//! Errors of the vision crate. Each message names the offending item and fits on one line.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unrecognised image format (first bytes {magic:02x?}; expected JPEG or PNG)")]
    UnknownFormat { magic: Vec<u8> },

    #[error("corrupt or truncated {format} data: {reason}")]
    Corrupt { format: &'static str, reason: String },

    #[error("unsupported {format} image: {reason}")]
    Unsupported { format: &'static str, reason: String },

    #[error("image is {width}x{height}; both sides must be at least 1 and at most {max}")]
    BadDimensions { width: u32, height: u32, max: u32 },

    #[error(
        "image claims {width}x{height} = {pixels} pixels, over the decoded-pixel budget of {max_pixels} \
         (a decompression bomb or a huge photo; raise data.max_image_pixels / --max-image-pixels to accept it)"
    )]
    TooManyPixels { width: u32, height: u32, pixels: u64, max_pixels: u64 },

    #[error("{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("output slot holds {found} floats, the transform writes {expected} (channels x height x width)")]
    SlotSize { expected: usize, found: usize },

    #[error("resize: {reason}")]
    Resize { reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
