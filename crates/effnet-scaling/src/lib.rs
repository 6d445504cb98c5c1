//! EfficientNet's compound scaling as pure arithmetic, in the one place the job spec, the model
//! builder, the command line and the trainer all read it (no libtorch, so it builds in seconds).
//!
//! A network is either a named variant, whose (width, depth, resolution, dropout) row comes from
//! the published table, or a custom compound coefficient `phi`, whose row [`compound_scaling`]
//! computes. Either way the result is a [`Scaling`]; the model then rounds channels
//! ([`round_channels`]) and repeats ([`scale_depth`]) of B0's stages with it.
//!
//! ```
//! use effnet_scaling::{compound_scaling, CompoundCoefficients, Variant};
//!
//! assert_eq!(Variant::B7.scaling().resolution, 600);
//! let custom = compound_scaling(1.0, CompoundCoefficients::default())?;
//! assert_eq!((custom.resolution, custom.dropout), (256, 0.25));
//! # Ok::<(), effnet_scaling::Error>(())
//! ```
//!
//! # Layout
//! - `scaling`: `round_channels`/`make_divisible`, `scale_depth`, the B0–B7 table ([`Variant`]),
//!   [`CompoundCoefficients`] and [`compound_scaling`] for custom phi, with the accepted ranges.
//! - `batch_norm`: [`BatchNormStyle`] and the eps/momentum ([`BatchNormParams`]) it gives a network.
//! - `classifier`: [`ClassifierInit`].
//! - `reference`: published parameter counts, FLOPs and accuracy of B0–B7 ([`Variant::reference`]).
//! - `error`: [`Error`].

mod batch_norm;
mod classifier;
mod error;
pub mod reference;
mod scaling;

pub use batch_norm::{BatchNormParams, BatchNormStyle};
pub use classifier::ClassifierInit;
pub use error::{Error, Result};
pub use reference::Reference;
pub use scaling::{
    BASE_RESOLUTION, CompoundCoefficients, MAX_MULTIPLIER, MAX_PHI, MIN_COEFFICIENT, MIN_MULTIPLIER, MIN_PHI,
    Scaling, Variant, compound_scaling, make_divisible, multiplier_scaling, round_channels, scale_depth,
    validate_phi,
};
