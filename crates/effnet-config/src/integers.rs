//! Integer fields with messages a user can act on.
//!
//! Plain `u32` fields would report `-3` as "invalid value: integer `-3`, expected u32". These
//! helpers accept any integer, then say what the field needs ("a positive integer"), so a
//! negative or zero batch size reads the same as any other out-of-range value.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// What a field accepts, as said in the error message.
trait Bound {
    const MIN: u64;
    const EXPECTED: &'static str;
}

struct Positive;
impl Bound for Positive {
    const MIN: u64 = 1;
    const EXPECTED: &'static str = "a positive integer";
}

struct NonNegative;
impl Bound for NonNegative {
    const MIN: u64 = 0;
    const EXPECTED: &'static str = "a non-negative integer";
}

/// An integer of at least `B::MIN` and at most `MAX`.
struct Bounded<B, const MAX: u64>(u64, PhantomData<B>);

impl<'de, B: Bound, const MAX: u64> Deserialize<'de> for Bounded<B, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `deserialize_any` so that a negative number reaches `visit_i64` and gets our message
        // instead of the YAML layer's "expected u64".
        deserializer.deserialize_any(BoundedVisitor::<B, MAX>(PhantomData)).map(|v| Bounded(v, PhantomData))
    }
}

struct BoundedVisitor<B, const MAX: u64>(PhantomData<B>);

impl<B: Bound, const MAX: u64> BoundedVisitor<B, MAX> {
    fn too_small<E: de::Error>(value: impl fmt::Display) -> E {
        E::custom(format_args!("invalid value {value}, expected {}", B::EXPECTED))
    }

    fn too_large<E: de::Error>(value: impl fmt::Display) -> E {
        E::custom(format_args!("invalid value {value}, expected {} of at most {MAX}", B::EXPECTED))
    }
}

impl<B: Bound, const MAX: u64> Visitor<'_> for BoundedVisitor<B, MAX> {
    type Value = u64;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(B::EXPECTED)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        if value < B::MIN {
            Err(Self::too_small(value))
        } else if value > MAX {
            Err(Self::too_large(value))
        } else {
            Ok(value)
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(Self::too_small(value)),
        }
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<u64, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(Self::too_large(value)),
        }
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<u64, E> {
        if value < 0 {
            return Err(Self::too_small(value));
        }
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(Self::too_large(value)),
        }
    }
}

const U32_MAX: u64 = u32::MAX as u64;

fn narrow(value: u64) -> u32 {
    // The visitor already rejected anything above U32_MAX.
    u32::try_from(value).unwrap_or(u32::MAX)
}

pub(crate) fn positive_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    Bounded::<Positive, U32_MAX>::deserialize(deserializer).map(|v| narrow(v.0))
}

pub(crate) fn non_negative_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    Bounded::<NonNegative, U32_MAX>::deserialize(deserializer).map(|v| narrow(v.0))
}

pub(crate) fn non_negative_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    Bounded::<NonNegative, { u64::MAX }>::deserialize(deserializer).map(|v| v.0)
}

pub(crate) fn positive_u32_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    Option::<Bounded<Positive, U32_MAX>>::deserialize(deserializer).map(|v| v.map(|v| narrow(v.0)))
}

pub(crate) fn positive_u64_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Option::<Bounded<Positive, { u64::MAX }>>::deserialize(deserializer).map(|v| v.map(|v| v.0))
}

pub(crate) fn non_negative_u64_opt<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    Option::<Bounded<NonNegative, { u64::MAX }>>::deserialize(deserializer).map(|v| v.map(|v| v.0))
}
