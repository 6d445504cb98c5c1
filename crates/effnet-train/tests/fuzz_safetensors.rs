//! Property tests of the safetensors reader (`tensors::from_safetensors`), which reads every
//! checkpoint's weights, optimiser slots and EMA (a resume, `effnet eval`). A file written by the project's own writer, then its bytes mutated, and headers generated with
//! any dtype, shape and offsets: the reader gives tensors or an error message, never a panic,
//! and never a tensor larger than the file it came from.
//!
//! Cases per property: 2,000 by default (each takes microseconds); `PROPTEST_CASES=100000 cargo test
//! -p effnet-train --test fuzz_safetensors` for a long run. Failing inputs are saved in
//! `fuzz_safetensors.proptest-regressions` beside this file and replayed first on every later
//! run; the two there are the cases below that found the bugs.

use effnet_train::tensors::{from_safetensors, to_safetensors};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// A file as the trainer writes one: three tensors of different dtypes and ranks.
fn written() -> Vec<u8> {
    let weights = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]);
    let half = Tensor::arange(5, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let count = Tensor::from_slice(&[7i64, -1]);
    to_safetensors(&[("w".into(), weights), ("half".into(), half), ("count".into(), count)]).unwrap()
}

/// A file with `header` as its JSON header, followed by `data`.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// What the reader must do with any input: tensors no larger than the input, or a message.
fn read_checked(bytes: &[u8]) -> Result<usize, String> {
    let tensors = from_safetensors(bytes)?;
    let mut total = 0;
    for (name, tensor) in &tensors {
        // Not `numel`, whose product overflows on a shape like [2^62, 4, 0] before the 0.
        let shape = tensor.size();
        let elements = if shape.contains(&0) {
            0
        } else {
            shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).unwrap_or(usize::MAX)
        };
        let size = elements.saturating_mul(tensor.kind().elt_size_in_bytes());
        assert!(size <= bytes.len(), "tensor {name} of {size} bytes from a {}-byte file", bytes.len());
        total += size;
    }
    assert!(total <= bytes.len(), "{total} bytes of tensors from a {}-byte file", bytes.len());
    Ok(tensors.len())
}

#[test]
fn the_writers_file_reads_back() {
    assert_eq!(read_checked(&written()), Ok(3));
}

/// Found by probing crafted headers, and by `generated_headers_give_tensors_or_an_error` on the
/// code before the fix (within 5,000 cases): a shape whose product is 0 passes the
/// safetensors crate's size check whatever its other dimensions, and a dimension of 2^63 or more
/// panicked in libtorch's tensor constructor (a negative size once cast to i64).
#[test]
fn a_dimension_beyond_i64_beside_a_zero_is_an_error() {
    for shape in ["[0,9223372036854775808]", "[0,18446744073709551615]", "[9223372036854775808,0]"] {
        let header = format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
        let error = read_checked(&file(&header, &[])).unwrap_err();
        assert!(
            error.contains("tensor w has shape") && error.contains("beyond what a tensor can have"),
            "{error}"
        );
    }
    // Within i64 the empty tensor is real, and the model's shape check refuses it later.
    let header = r#"{"w":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}"#;
    assert_eq!(read_checked(&file(header, &[])), Ok(1));
}

#[test]
fn sizes_that_overflow_or_exceed_the_file_are_errors() {
    for (header, data) in [
        (r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, &[][..]),
        (r#"{"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}"#, &[][..]),
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0u8; 4][..]),
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}}"#, &[0u8; 8][..]),
        (r#"{"w":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}"#, &[1u8][..]),
    ] {
        assert!(read_checked(&file(header, data)).is_err(), "{header} was read");
    }
    // A header length beyond the file.
    let mut bytes = written();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(read_checked(&bytes).is_err());
}

/// A dimension: mostly small, sometimes 0, sometimes near a power of two or the top of u64.
fn dimension() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..5,
        1 => Just(0u64),
        1 => (0u32..64).prop_map(|bits| 1u64 << bits),
        1 => (0u32..64).prop_map(|bits| (1u64 << bits).wrapping_sub(1)),
        1 => any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    /// Overwritten bytes anywhere (the header's length and JSON above all), or the file cut short.
    #[test]
    fn mutated_files_give_tensors_or_an_error(
        overwrites in prop::collection::vec((0.0f64..1.0, any::<u8>()), 1..8),
        in_header in any::<bool>(),
        keep in prop_oneof![4 => Just(1.0), 1 => 0.0f64..1.0],
    ) {
        let mut bytes = written();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let len = bytes.len();
        for (at, value) in overwrites {
            let span = if in_header { header_end } else { len };
            bytes[((at * span as f64) as usize).min(len - 1)] = value;
        }
        bytes.truncate((keep * len as f64).ceil() as usize);
        if let Err(message) = read_checked(&bytes) {
            prop_assert!(!message.is_empty());
        }
    }

    /// Headers generated whole: any supported or unsupported dtype, any shape, and offsets laid
    /// end to end over the data as a writer lays them (the crate refuses anything else early), or
    /// anywhere.
    #[test]
    fn generated_headers_give_tensors_or_an_error(
        tensors in prop::collection::vec(
            (
                prop::sample::select(vec!["F32", "F64", "BF16", "F16", "I64", "I32", "U8", "I8", "BOOL", "X"]),
                prop::collection::vec(dimension(), 0..4),
                prop_oneof![3 => Just(0u64), 1 => 0u64..24],
                (0u64..80, 0u64..80),
            ),
            1..4,
        ),
        laid_out in prop_oneof![3 => Just(true), 1 => Just(false)],
        data_len in 0usize..80,
    ) {
        let mut at = 0;
        let mut entries = Vec::new();
        for (i, (dtype, shape, len, anywhere)) in tensors.iter().enumerate() {
            let (start, end) = if laid_out { (at, at + len) } else { *anywhere };
            at = end;
            entries.push(format!(
                r#""t{i}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}"#
            ));
        }
        let data_len = if laid_out { at as usize } else { data_len };
        let bytes = file(&format!("{{{}}}", entries.join(",")), &vec![0x3f; data_len]);
        if let Err(message) = read_checked(&bytes) {
            prop_assert!(!message.is_empty());
        }
    }
}
