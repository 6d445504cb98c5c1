//! Property tests: mutated real JPEG/PNG bytes and header-forged sizes through every decode path
//! and both transforms. Each input must give an image or a typed error: never a panic, and never
//! an allocation beyond [`LARGEST_ALLOCATION`] (this binary's allocator refuses one, which aborts
//! the test loudly instead of paging the machine to death).
//!
//! Cases per property: 64 by default so `make test` stays fast; `PROPTEST_CASES=100000 cargo test
//! -p effnet-vision --test fuzz_decode` for a long run. Failing inputs are saved under
//! `proptest-regressions/` and replayed first on every later run.

use std::alloc::{GlobalAlloc, Layout, System};

use effnet_vision::{
    DEFAULT_MAX_PIXELS, EvalConfig, EvalTransform, SampleRng, TrainConfig, TrainTransform, decode,
    decode_reduced, probe,
};
use image::ImageEncoder;
use proptest::prelude::*;

/// Larger than any decode within the default pixel budget needs (89,478,485 RGB pixels = 256 MiB),
/// far smaller than what a forged header would claim without the budget.
const LARGEST_ALLOCATION: usize = 512 << 20;

struct CappedAllocator;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the GlobalAlloc contract.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc(layout) }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fn photo(width: u32, height: u32) -> Vec<u8> {
    (0..width * height * 3).map(|i| ((i * 31 + i / 7) % 251) as u8).collect()
}

/// Real files of both formats and several kinds: baseline and grey JPEG, RGB, RGBA and grey PNG.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (width, height) in [(16, 16), (33, 17)] {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
            .encode(&photo(width, height), width, height, image::ExtendedColorType::Rgb8)
            .unwrap();
        seeds.push(jpeg);
        let mut grey = Vec::new();
        let luma: Vec<u8> = photo(width, height).into_iter().step_by(3).collect();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut grey, 70)
            .encode(&luma, width, height, image::ExtendedColorType::L8)
            .unwrap();
        seeds.push(grey);
        for (color, channels) in [
            (image::ExtendedColorType::Rgb8, 3),
            (image::ExtendedColorType::Rgba8, 4),
            (image::ExtendedColorType::L8, 1),
        ] {
            let pixels: Vec<u8> = (0..width * height * channels).map(|i| (i % 256) as u8).collect();
            let mut png = Vec::new();
            image::codecs::png::PngEncoder::new(&mut png).write_image(&pixels, width, height, color).unwrap();
            seeds.push(png);
        }
    }
    seeds
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Rewrite the size a header claims: PNG's IHDR (with a valid CRC, so the lie is believed) or a
/// JPEG's SOF0 frame header.
fn forge_size(bytes: &mut [u8], width: u32, height: u32) {
    if bytes.starts_with(b"\x89PNG") {
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    } else if let Some(sof) = bytes.windows(2).position(|w| w == [0xFF, 0xC0])
        && sof + 9 <= bytes.len()
    {
        bytes[sof + 5..sof + 7].copy_from_slice(&(height.min(u16::MAX as u32) as u16).to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&(width.min(u16::MAX as u32) as u16).to_be_bytes());
    }
}

#[derive(Debug, Clone)]
struct Mutation {
    seed: usize,
    /// (position as a fraction of the length, new byte)
    overwrites: Vec<(f64, u8)>,
    /// Keep this fraction of the bytes (1.0: all).
    keep: f64,
    /// Claimed size written into the header before the other mutations.
    forged: Option<(u32, u32)>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        0usize..10,
        prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..8),
        prop_oneof![3 => Just(1.0), 1 => 0.0f64..1.0],
        prop::option::weighted(
            0.3,
            // Small lies decode garbage or fail on missing data; huge ones meet the side limit or the
            // budget. Lies just under the budget cost a budget-sized buffer each (slow at the test
            // profile's opt-level 0), so one explicit test covers them.
            prop_oneof![(1u32..=1024, 1u32..=1024), (0u32..=u32::MAX, 0u32..=u32::MAX)],
        ),
    )
        .prop_map(|(seed, overwrites, keep, forged)| Mutation { seed, overwrites, keep, forged })
}

fn apply(mutation: &Mutation, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = seeds[mutation.seed % seeds.len()].clone();
    if let Some((width, height)) = mutation.forged {
        forge_size(&mut bytes, width, height);
    }
    let len = bytes.len();
    for &(at, value) in &mutation.overwrites {
        bytes[((at * len as f64) as usize).min(len - 1)] = value;
    }
    bytes.truncate((mutation.keep * len as f64).ceil() as usize);
    bytes
}

fn config() -> ProptestConfig {
    // PROPTEST_CASES overrides this default (proptest reads it for `ProptestConfig::default()`).
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// A small file claiming a size just under the budget: refused as corrupt, before the decoder
/// allocates the claimed size (the file is too short to encode it). Before that check a forged
/// JPEG here decoded "successfully" into 268 MB of padding; kept as a regression case.
#[test]
fn a_lie_just_under_the_budget_is_refused_as_corrupt() {
    for seed in seeds() {
        let mut bytes = seed.clone();
        forge_size(&mut bytes, 9459, 9459); // 89,472,681 pixels, just under 89,478,485
        match decode(&bytes) {
            Err(effnet_vision::Error::Corrupt { reason, .. }) => {
                assert!(reason.contains("cannot encode it"), "{reason}")
            }
            other => panic!("expected corrupt data, got {:?}", other.map(|i| (i.width, i.height))),
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_images_decode_or_fail_with_a_typed_error(mutation in mutation(), reduction in prop::sample::select(vec![1u32, 2, 4, 8])) {
        let seeds = seeds();
        let bytes = apply(&mutation, &seeds);
        let header = probe(&bytes);
        for image in [decode(&bytes), decode_reduced(&bytes, reduction)].into_iter().flatten() {
            let pixels = image.width as u64 * image.height as u64;
            prop_assert!((1..=DEFAULT_MAX_PIXELS).contains(&pixels));
            prop_assert_eq!(image.data.len() as u64, pixels * image.channels as u64);
            prop_assert!(header.is_ok(), "decoded what probe refused");
        }
        let train = TrainTransform::new(TrainConfig::imagenet(32)).unwrap();
        let mut out = vec![0f32; train.sample_len()];
        if train.apply(&bytes, &mut SampleRng::new(1, 2, "fuzz"), &mut out).is_ok() {
            prop_assert!(out.iter().all(|v| v.is_finite()));
        }
        let eval = EvalTransform::new(EvalConfig::imagenet(32)).unwrap();
        if eval.apply(&bytes, &mut out).is_ok() {
            prop_assert!(out.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn forged_sizes_over_the_budget_are_refused_before_decoding(seed in 0usize..10, width in 1u32..=16384, height in 1u32..=16384) {
        let seeds = seeds();
        let mut bytes = seeds[seed].clone();
        forge_size(&mut bytes, width, height);
        let result = decode(&bytes);
        if width as u64 * height as u64 > DEFAULT_MAX_PIXELS {
            let refused = matches!(result, Err(effnet_vision::Error::TooManyPixels { .. }));
            prop_assert!(refused, "{}x{} not refused by the budget: {:?}", width, height, result.map(|i| (i.width, i.height)));
        }
    }
}
