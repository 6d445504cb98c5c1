//! Errors of the scaling crate: a name or a number outside the table's domain. Each message
//! names the offending item and its value, on one line.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown variant '{name}' (expected b0..b7)")]
    UnknownVariant { name: String },

    #[error("compound coefficient {name} must be a finite number >= {min}, got {value}", min = crate::MIN_COEFFICIENT)]
    InvalidCoefficient { name: &'static str, value: f64 },

    #[error("phi must be a finite number in [{min}, {max}], got {value}", min = crate::MIN_PHI, max = crate::MAX_PHI)]
    InvalidPhi { value: f64 },

    #[error("{name} multiplier must be a finite number in [{min}, {max}], got {value}", min = crate::MIN_MULTIPLIER, max = crate::MAX_MULTIPLIER)]
    InvalidMultiplier { name: &'static str, value: f64 },

    #[error("batch_norm must be one of torchvision, tf, pytorch (timm), got '{name}'")]
    UnknownBatchNormStyle { name: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
