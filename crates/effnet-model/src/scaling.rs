//! Compound scaling (EfficientNet paper, arXiv 1905.11946, section 3.3): `round_channels`,
//! `scale_depth`, the B0–B7 table and custom phi.
//!
//! The arithmetic lives in the libtorch-free `effnet-scaling` crate, the one table the job spec,
//! the command line and the trainer read too; it is re-exported here so the model's own paths
//! (`effnet_model::scaling::round_channels`, `effnet_model::Variant`) name the same items.
//!
//! ```
//! use effnet_model::scaling::{CompoundCoefficients, compound_scaling, round_channels};
//! assert_eq!(round_channels(16, 1.4, 8), 24);
//! assert_eq!(compound_scaling(1.0, CompoundCoefficients::default()).unwrap().resolution, 256);
//! ```

pub use effnet_scaling::{
    BASE_RESOLUTION, CompoundCoefficients, MAX_PHI, MIN_COEFFICIENT, MIN_PHI, Scaling, Variant,
    compound_scaling, make_divisible, multiplier_scaling, round_channels, scale_depth, validate_phi,
};
