//! Compound scaling (EfficientNet paper, arXiv 1905.11946, section 3.3).
//!
//! A network is scaled by a width multiplier `w` (channels), a depth multiplier `d` (repeats of
//! each stage) and an input resolution `r`. The named variants B0–B7 use the published table;
//! a custom variant derives all three from one compound coefficient `phi`:
//! `d = alpha^phi`, `w = beta^phi`, `r = gamma^phi · 224`, where `alpha · beta² · gamma² ≈ 2`
//! so FLOPs grow by about `2^phi`.
//!
//! Everything here is a small pure function; the model only ever sees the final numbers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The resolution B0 was searched at; custom variants scale from it.
pub const BASE_RESOLUTION: u32 = 224;

/// The smallest compound coefficient phi accepted: B0 shrunk to about a sixteenth of its FLOPs.
pub const MIN_PHI: f64 = -4.0;
/// The largest phi accepted: far past B7 (phi 7), and still a network that can be built.
pub const MAX_PHI: f64 = 16.0;
/// The paper's constraint on the bases: `alpha, beta, gamma >= 1`, so a larger phi never gives
/// a shallower, thinner or smaller network (shrinking is what a negative phi is for).
pub const MIN_COEFFICIENT: f64 = 1.0;

/// Round `channels · width` to a multiple of `divisor`, never below `divisor` and never more
/// than 10% below the unrounded value.
///
/// This is the rule of the reference implementations (TF `round_filters`, torchvision
/// `_make_divisible`, timm `round_channels`): round to nearest, then bump one step up if
/// rounding lost more than 10%, because a layer much thinner than asked for would break the
/// scaling law the variant table was measured with.
///
/// ```
/// use effnet_scaling::round_channels;
/// assert_eq!(round_channels(32, 1.0, 8), 32);
/// assert_eq!(round_channels(32, 1.1, 8), 32); // 35.2 rounds to 32 (within 10%)
/// assert_eq!(round_channels(16, 1.4, 8), 24); // 22.4 rounds to 24
/// assert_eq!(round_channels(1, 1.0, 8), 8);   // never below the divisor
/// ```
pub fn round_channels(channels: u32, width: f64, divisor: u32) -> u32 {
    make_divisible(channels as f64 * width, divisor)
}

/// `make_divisible(v, divisor)`: the nearest multiple of `divisor` to `v`, at least `divisor`,
/// bumped up one step when it would fall below 90% of `v`.
pub fn make_divisible(value: f64, divisor: u32) -> u32 {
    let divisor_f = divisor as f64;
    // int(v + d/2) // d * d, as in the reference code (truncation of a positive number).
    let rounded = (((value + divisor_f / 2.0) as u64) / divisor as u64 * divisor as u64) as u32;
    let mut channels = rounded.max(divisor);
    if (channels as f64) < 0.9 * value {
        channels += divisor;
    }
    channels
}

/// Scale a stage's number of repeats: `ceil(repeats · depth)`.
///
/// Ceil rather than round: a stage never loses a block to scaling, so every variant keeps at
/// least B0's depth in every stage (B1's 1.1 turns a 1-block stage into 2 blocks).
///
/// ```
/// use effnet_scaling::scale_depth;
/// assert_eq!(scale_depth(1, 1.1), 2);
/// assert_eq!(scale_depth(4, 3.1), 13);
/// assert_eq!(scale_depth(3, 1.0), 3);
/// ```
pub fn scale_depth(repeats: u32, depth: f64) -> u32 {
    // Guard against 3 * 1.0000000001 style float noise turning an exact product into +1.
    let scaled = repeats as f64 * depth;
    let nearest = scaled.round();
    if (scaled - nearest).abs() < 1e-9 { nearest as u32 } else { scaled.ceil() as u32 }
}

/// The named variants of the paper. Serialised as job files spell them: `b0` … `b7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    B0,
    B1,
    B2,
    B3,
    B4,
    B5,
    B6,
    B7,
}

impl Variant {
    pub const ALL: [Variant; 8] = [
        Variant::B0,
        Variant::B1,
        Variant::B2,
        Variant::B3,
        Variant::B4,
        Variant::B5,
        Variant::B6,
        Variant::B7,
    ];

    /// The published (width, depth, resolution, dropout) table, the single place it lives.
    /// Source: the paper's released code (`efficientnet_params`), identical in torchvision.
    ///
    /// ```
    /// use effnet_scaling::Variant;
    /// let b5 = Variant::B5.scaling();
    /// assert_eq!((b5.width, b5.depth, b5.resolution, b5.dropout), (1.6, 2.2, 456, 0.4));
    /// ```
    pub fn scaling(self) -> Scaling {
        let (width, depth, resolution, dropout) = match self {
            Variant::B0 => (1.0, 1.0, 224, 0.2),
            Variant::B1 => (1.0, 1.1, 240, 0.2),
            Variant::B2 => (1.1, 1.2, 260, 0.3),
            Variant::B3 => (1.2, 1.4, 300, 0.3),
            Variant::B4 => (1.4, 1.8, 380, 0.4),
            Variant::B5 => (1.6, 2.2, 456, 0.4),
            Variant::B6 => (1.8, 2.6, 528, 0.5),
            Variant::B7 => (2.0, 3.1, 600, 0.5),
        };
        Scaling { width, depth, resolution, dropout }
    }

    /// The name as written in job files and on the command line: `b0` … `b7`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::B0 => "b0",
            Variant::B1 => "b1",
            Variant::B2 => "b2",
            Variant::B3 => "b3",
            Variant::B4 => "b4",
            Variant::B5 => "b5",
            Variant::B6 => "b6",
            Variant::B7 => "b7",
        }
    }

    /// Index 0..=7, which is also the variant's nominal compound coefficient phi.
    pub fn index(self) -> u32 {
        Variant::ALL.iter().position(|v| *v == self).unwrap_or(0) as u32
    }
}

impl std::str::FromStr for Variant {
    type Err = Error;

    /// Accepts `b3`, `B3`, `efficientnet-b3` and `efficientnet_b3`.
    fn from_str(text: &str) -> Result<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let short = lower
            .strip_prefix("efficientnet-")
            .or_else(|| lower.strip_prefix("efficientnet_"))
            .unwrap_or(&lower);
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == short)
            .ok_or_else(|| Error::UnknownVariant { name: text.to_string() })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Final scaling numbers of one network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Scaling {
    /// Channel multiplier.
    pub width: f64,
    /// Repeat multiplier.
    pub depth: f64,
    /// Input resolution (square).
    pub resolution: u32,
    /// Dropout rate before the classifier.
    pub dropout: f64,
}

/// The coefficients of compound scaling, found by grid search on B0 in the paper.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CompoundCoefficients {
    /// Depth base: `d = alpha^phi`.
    pub alpha: f64,
    /// Width base: `w = beta^phi`.
    pub beta: f64,
    /// Resolution base: `r = gamma^phi`.
    pub gamma: f64,
}

impl Default for CompoundCoefficients {
    fn default() -> Self {
        CompoundCoefficients { alpha: 1.2, beta: 1.1, gamma: 1.15 }
    }
}

impl CompoundCoefficients {
    /// Every coefficient must be a finite number of at least [`MIN_COEFFICIENT`].
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("alpha", self.alpha), ("beta", self.beta), ("gamma", self.gamma)] {
            if !(value.is_finite() && value >= MIN_COEFFICIENT) {
                return Err(Error::InvalidCoefficient { name, value });
            }
        }
        Ok(())
    }

    /// FLOPs multiplier per unit of phi, `alpha · beta² · gamma²` (≈ 2 for the paper's values).
    pub fn flops_base(&self) -> f64 {
        self.alpha * self.beta * self.beta * self.gamma * self.gamma
    }
}

/// `phi` must be finite and within [`MIN_PHI`, `MAX_PHI`].
pub fn validate_phi(phi: f64) -> Result<()> {
    if phi.is_finite() && (MIN_PHI..=MAX_PHI).contains(&phi) {
        Ok(())
    } else {
        Err(Error::InvalidPhi { value: phi })
    }
}

/// Scaling of a custom variant from the compound coefficient `phi`. This is the one rule for
/// custom networks; the job spec, the model builder and the command line all call it.
///
/// Resolution is `224 · gamma^phi` rounded to a multiple of 8 (the named variants' resolutions
/// are all multiples of 4 and the stride-32 network prefers multiples of 8), at least 32;
/// dropout grows linearly from B0's 0.2 by 0.05 per unit of phi and is capped at B6/B7's 0.5
/// (and floored at 0 for very negative phi).
///
/// ```
/// use effnet_scaling::{compound_scaling, CompoundCoefficients};
/// let s = compound_scaling(0.0, CompoundCoefficients::default()).unwrap();
/// assert_eq!((s.width, s.depth, s.resolution), (1.0, 1.0, 224));
/// // 224 · 1.15 = 257.6, the nearest multiple of 8 is 256.
/// let s = compound_scaling(1.0, CompoundCoefficients::default()).unwrap();
/// assert_eq!((s.resolution, s.dropout), (256, 0.25));
/// assert!(compound_scaling(1.0, CompoundCoefficients { alpha: 0.0, beta: 1.1, gamma: 1.15 }).is_err());
/// ```
pub fn compound_scaling(phi: f64, coefficients: CompoundCoefficients) -> Result<Scaling> {
    coefficients.validate()?;
    validate_phi(phi)?;
    let width = coefficients.beta.powf(phi);
    let depth = coefficients.alpha.powf(phi);
    let resolution_exact = BASE_RESOLUTION as f64 * coefficients.gamma.powf(phi);
    let resolution = ((resolution_exact / 8.0).round() as u32 * 8).max(32);
    let dropout = (0.2 + 0.05 * phi).clamp(0.0, 0.5);
    Ok(Scaling { width, depth, resolution, dropout })
}

/// The smallest and largest explicit width or depth multiplier ([`multiplier_scaling`]).
pub const MIN_MULTIPLIER: f64 = 0.1;
pub const MAX_MULTIPLIER: f64 = 8.0;

/// Scaling of a custom member given by its multipliers directly: B0's stages with `width`
/// times the channels and `depth` times the repeats, at B0's 224 pixels unless the job gives a
/// resolution, and B0's dropout (0.2). What a scaling study needs to move one dimension at a
/// time from any base (the compound rule ties them through one phi).
///
/// ```
/// use effnet_scaling::multiplier_scaling;
/// let s = multiplier_scaling(0.5, 1.2).unwrap();
/// assert_eq!((s.width, s.depth, s.resolution, s.dropout), (0.5, 1.2, 224, 0.2));
/// assert!(multiplier_scaling(0.05, 1.0).is_err());
/// ```
pub fn multiplier_scaling(width: f64, depth: f64) -> Result<Scaling> {
    for (name, value) in [("width", width), ("depth", depth)] {
        if !(value.is_finite() && (MIN_MULTIPLIER..=MAX_MULTIPLIER).contains(&value)) {
            return Err(Error::InvalidMultiplier { name, value });
        }
    }
    Ok(Scaling { width, depth, resolution: BASE_RESOLUTION, dropout: 0.2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_reference_rule() {
        // Values from torchvision's _make_divisible for the channel counts the variants use.
        let cases = [
            (32.0 * 1.1, 32),
            (16.0 * 1.1, 16),
            (24.0 * 1.1, 24),
            (40.0 * 1.1, 48),
            (80.0 * 1.1, 88),
            (112.0 * 1.1, 120),
            (192.0 * 1.1, 208),
            (320.0 * 1.1, 352),
            (32.0 * 1.2, 40),
            (24.0 * 1.2, 32),
            (40.0 * 1.4, 56),
            (112.0 * 1.8, 200),
            (320.0 * 2.0, 640),
            (3.0, 8),
        ];
        for (value, expected) in cases {
            assert_eq!(make_divisible(value, 8), expected, "make_divisible({value})");
        }
    }

    #[test]
    fn make_divisible_never_below_ninety_percent() {
        for tenths in 80..4000 {
            let value = tenths as f64 / 10.0;
            let rounded = make_divisible(value, 8);
            assert!(rounded as f64 >= 0.9 * value, "{value} -> {rounded}");
            assert_eq!(rounded % 8, 0);
        }
    }

    #[test]
    fn depth_uses_ceil() {
        assert_eq!(scale_depth(1, 1.1), 2);
        assert_eq!(scale_depth(2, 1.1), 3);
        assert_eq!(scale_depth(3, 1.2), 4);
        assert_eq!(scale_depth(4, 1.8), 8);
        assert_eq!(scale_depth(1, 3.1), 4);
        assert_eq!(scale_depth(3, 2.2), 7);
        // float noise must not add a block: 3 * 1.4 is 4.2 but 5 * 1.4 is exactly 7.
        assert_eq!(scale_depth(5, 1.4), 7);
    }

    #[test]
    fn variant_table_is_the_published_one() {
        let rows: Vec<_> = Variant::ALL
            .iter()
            .map(|variant| {
                let s = variant.scaling();
                (s.width, s.depth, s.resolution, s.dropout)
            })
            .collect();
        assert_eq!(
            rows,
            [
                (1.0, 1.0, 224, 0.2),
                (1.0, 1.1, 240, 0.2),
                (1.1, 1.2, 260, 0.3),
                (1.2, 1.4, 300, 0.3),
                (1.4, 1.8, 380, 0.4),
                (1.6, 2.2, 456, 0.4),
                (1.8, 2.6, 528, 0.5),
                (2.0, 3.1, 600, 0.5),
            ]
        );
        assert_eq!(Variant::B3.index(), 3);
    }

    #[test]
    fn variant_parsing() {
        assert_eq!("b7".parse::<Variant>().unwrap(), Variant::B7);
        assert_eq!("EfficientNet-B2".parse::<Variant>().unwrap(), Variant::B2);
        assert_eq!("efficientnet_b0".parse::<Variant>().unwrap(), Variant::B0);
        let err = "b9".parse::<Variant>().unwrap_err();
        assert!(err.to_string().contains("'b9'"), "{err}");
    }

    #[test]
    fn variant_serde_names_are_the_job_file_names() {
        for variant in Variant::ALL {
            let json = format!("\"{}\"", variant.name());
            assert_eq!(serde_json::to_string(&variant).unwrap(), json);
            assert_eq!(serde_json::from_str::<Variant>(&json).unwrap(), variant);
        }
        assert!(serde_json::from_str::<Variant>("\"B0\"").is_err());
    }

    #[test]
    fn compound_scaling_follows_the_powers() {
        let coefficients = CompoundCoefficients::default();
        assert!((coefficients.flops_base() - 1.92).abs() < 0.01);
        let s = compound_scaling(2.0, coefficients).unwrap();
        assert!((s.depth - 1.44).abs() < 1e-12);
        assert!((s.width - 1.21).abs() < 1e-12);
        // 224 * 1.15^2 = 296.24 -> 296
        assert_eq!(s.resolution, 296);
        assert!((s.dropout - 0.3).abs() < 1e-12);
        assert_eq!(compound_scaling(10.0, coefficients).unwrap().dropout, 0.5);
    }

    #[test]
    fn custom_resolution_is_a_multiple_of_eight_and_dropout_is_linear() {
        // (phi, 224·1.15^phi, rounded to 8, 0.2 + 0.05·phi): the values the CLI test expects.
        let cases = [(-1.0, 192, 0.15), (0.5, 240, 0.225), (1.0, 256, 0.25), (2.5, 320, 0.325)];
        for (phi, resolution, dropout) in cases {
            let s = compound_scaling(phi, CompoundCoefficients::default()).unwrap();
            assert_eq!(s.resolution, resolution, "phi {phi}");
            assert!((s.dropout - dropout).abs() < 1e-12, "phi {phi}: {}", s.dropout);
        }
        let smallest = compound_scaling(MIN_PHI, CompoundCoefficients::default()).unwrap();
        assert_eq!((smallest.resolution, smallest.dropout), (128, 0.0));
    }

    #[test]
    fn invalid_coefficients_are_rejected_with_the_value() {
        for (alpha, beta, gamma, name) in [
            (0.0, 1.1, 1.15, "alpha"),
            (1.2, -1.0, 1.15, "beta"),
            (1.2, 1.1, f64::NAN, "gamma"),
            (1.2, 1.1, 0.9, "gamma"),
        ] {
            let err = compound_scaling(1.0, CompoundCoefficients { alpha, beta, gamma }).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(name), "{message}");
        }
        let err =
            compound_scaling(1.0, CompoundCoefficients { alpha: -2.5, beta: 1.1, gamma: 1.15 }).unwrap_err();
        assert!(err.to_string().contains("-2.5"), "{err}");
        assert!(compound_scaling(f64::INFINITY, CompoundCoefficients::default()).is_err());
        let err = compound_scaling(-4.5, CompoundCoefficients::default()).unwrap_err();
        assert_eq!(err.to_string(), "phi must be a finite number in [-4, 16], got -4.5");
        assert!(compound_scaling(16.0, CompoundCoefficients::default()).is_ok());
    }
}
