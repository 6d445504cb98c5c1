//! Image decode and augmentation for effnet: encoded JPEG/PNG bytes in, normalised f32 CHW samples
//! written straight into a contiguous batch buffer out. No libtorch: the buffers are plain `Vec`s
//! that the training crate turns into tensors without copying.
//!
//! # How a sample flows
//!
//! ```text
//! bytes ──probe──▶ (width, height) ──RandomResizedCrop::sample(rng)──▶ crop box, flip
//!       ──decode_reduced (1/4 or 1/8 in the DCT domain when the crop is ≥ 4× the output)──▶ Image (u8 HWC)
//!       ──resize crop region → size × size──▶ (grey?) ──RandAugment(rng)?──▶ normalise (+flip) ──▶ slot in BatchBuffer
//! ```
//!
//! The randomness of a sample comes from [`SampleRng::new`]`(seed, epoch, key)`, so the same sample
//! in the same epoch is augmented identically on any worker, in any order, after any resume.
//! Evaluation ([`EvalTransform`]) resizes the shorter side to `size / crop_pct` and centre-crops,
//! done as one resize of the centre region.
//!
//! ```no_run
//! use effnet_vision::{BatchBuffer, SampleRng, TrainConfig, TrainTransform};
//!
//! # fn main() -> effnet_vision::Result<()> {
//! # let samples: Vec<(String, Vec<u8>, i64)> = Vec::new();
//! let transform = TrainTransform::new(TrainConfig::imagenet(224))?;
//! let mut batch = BatchBuffer::new(samples.len(), 3, 224, 224);
//! // One slot per sample; a loader hands groups of slots to its worker threads.
//! for (slot, (key, bytes, label)) in batch.samples_mut().zip(&samples) {
//!     let mut rng = SampleRng::new(/* seed */ 0, /* epoch */ 3, key);
//!     transform.apply(bytes, &mut rng, slot.pixels)?;
//!     *slot.label = *label;
//!     slot.key.clone_from(key);
//! }
//! let parts = batch.into_parts(); // parts.pixels: Vec<f32>, N×3×224×224, ready for a tensor
//! # let _ = parts;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`decode`](mod@decode): format sniffing, header probing, full and DCT-reduced decoding.
//! - [`geometry`]: RandomResizedCrop boxes and eval resize/centre-crop geometry (torchvision maths).
//! - [`resize`]: antialiased bilinear resampling of a region (fast_image_resize).
//! - [`randaugment`]: the 14 RandAugment ops on 8-bit images.
//! - [`normalize`]: mean/std normalisation to CHW f32 through lookup tables.
//! - [`transform`]: [`TrainTransform`] / [`EvalTransform`], the per-sample pipelines.
//! - [`batch`]: [`BatchBuffer`], the N×C×H×W buffer filled in place.
//! - [`rng`]: [`SampleRng`], per-sample seeded randomness.
//!
//! # Decoders and speed
//! Full-size JPEG decoding uses `zune-jpeg`: 1170 images/s on one core for ~500×375 q90 photos, on
//! par with Pillow's libjpeg-turbo (1060–1140/s) and 2.5–3.4× faster than `jpeg-decoder`. Reduced
//! decoding uses `jpeg-decoder`, whose `Decoder::scale` runs a reduced-size IDCT, which zune-jpeg
//! lacks; it pays only from 1/4 on ([`decode::MIN_PAYING_REDUCTION`]). libjpeg-turbo (`turbojpeg`)
//! was not used: building it from crates.io needs cmake and nasm, absent here. PNG uses `png`.
//!
//! The whole train transform (decode → RandomResizedCrop 224 → flip → normalise) runs at ~960
//! images/s on one core against ~380/s for Pillow + torchvision v1 on the same files (2.5×); see
//! `benches/pipeline.rs` and the repository's `benches/python_image_pipeline.py`.

pub mod batch;
pub mod decode;
pub mod error;
pub mod geometry;
pub mod image;
pub mod normalize;
pub mod randaugment;
pub mod resize;
pub mod rng;
pub mod transform;

pub use batch::{BatchBuffer, BatchParts, SampleSlot};
pub use decode::{
    DEFAULT_MAX_PIXELS, ImageFormat, ImageHeader, decode, decode_reduced, decode_within, paying_reduction,
    probe, reduction_for_crop,
};
pub use error::{Error, Result};
pub use geometry::{CropBox, EvalGeometry, RandomResizedCrop, Region, eval_geometry};
pub use image::Image;
pub use normalize::Normalization;
pub use randaugment::{AugmentOp, RandAugment};
pub use rng::SampleRng;
pub use transform::{ChannelPolicy, EvalConfig, EvalTransform, TrainConfig, TrainTransform};
