//! BatchNorm hyper-parameters: which eps and momentum each network uses.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::scaling::Variant;

/// BatchNorm hyper-parameters (PyTorch convention: `momentum` weighs the new batch).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BatchNormParams {
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNormParams {
    /// The TF training recipe: eps 1e-3, decay 0.99 (PyTorch momentum 0.01).
    pub const TF: BatchNormParams = BatchNormParams { eps: 1e-3, momentum: 0.01 };
    /// PyTorch's `BatchNorm2d` defaults.
    pub const TORCH_DEFAULT: BatchNormParams = BatchNormParams { eps: 1e-5, momentum: 0.1 };
}

/// Where the BatchNorm settings come from. Serialised as job files spell it: `torchvision`,
/// `tf`, `pytorch` (`timm` is accepted for `pytorch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormStyle {
    /// torchvision's per-variant values (B0–B4: eps 1e-5, momentum 0.1; B5–B7: 1e-3, 0.01), so
    /// weights exported from torchvision behave identically. Custom variants use the TF values.
    #[default]
    Torchvision,
    /// The TF training recipe everywhere: eps 1e-3, decay 0.99 (PyTorch momentum 0.01).
    Tf,
    /// PyTorch's defaults everywhere (eps 1e-5, momentum 0.1), as timm's `efficientnet_bN`
    /// has them; use it to load timm weights of B5–B7.
    #[serde(alias = "timm")]
    Pytorch,
}

impl std::str::FromStr for BatchNormStyle {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "torchvision" => Ok(BatchNormStyle::Torchvision),
            "tf" => Ok(BatchNormStyle::Tf),
            "pytorch" | "timm" => Ok(BatchNormStyle::Pytorch),
            other => Err(Error::UnknownBatchNormStyle { name: other.to_string() }),
        }
    }
}

impl BatchNormStyle {
    /// The eps and momentum of a network: `variant` is the named variant, `None` for a custom
    /// phi (no torchvision weights exist for those, so they take the training recipe's values).
    ///
    /// ```
    /// use effnet_scaling::{BatchNormParams, BatchNormStyle, Variant};
    /// assert_eq!(BatchNormStyle::Torchvision.params(Some(Variant::B4)), BatchNormParams::TORCH_DEFAULT);
    /// assert_eq!(BatchNormStyle::Torchvision.params(Some(Variant::B5)), BatchNormParams::TF);
    /// assert_eq!(BatchNormStyle::Torchvision.params(None), BatchNormParams::TF);
    /// ```
    pub fn params(self, variant: Option<Variant>) -> BatchNormParams {
        match (self, variant) {
            (BatchNormStyle::Tf, _) => BatchNormParams::TF,
            (BatchNormStyle::Pytorch, _) => BatchNormParams::TORCH_DEFAULT,
            (BatchNormStyle::Torchvision, Some(variant)) if variant.index() >= 5 => BatchNormParams::TF,
            (BatchNormStyle::Torchvision, Some(_)) => BatchNormParams::TORCH_DEFAULT,
            (BatchNormStyle::Torchvision, None) => BatchNormParams::TF,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_deserialises_the_same_spellings() {
        for (text, style) in [
            ("torchvision", BatchNormStyle::Torchvision),
            ("tf", BatchNormStyle::Tf),
            ("pytorch", BatchNormStyle::Pytorch),
            ("timm", BatchNormStyle::Pytorch),
        ] {
            assert_eq!(text.parse::<BatchNormStyle>().unwrap(), style);
            assert_eq!(serde_json::from_str::<BatchNormStyle>(&format!("\"{text}\"")).unwrap(), style);
        }
        assert_eq!(serde_json::to_string(&BatchNormStyle::Pytorch).unwrap(), "\"pytorch\"");
        let err = "keras".parse::<BatchNormStyle>().unwrap_err();
        assert!(err.to_string().contains("batch_norm") && err.to_string().contains("'keras'"), "{err}");
    }

    #[test]
    fn torchvision_style_switches_at_b5() {
        let params: Vec<_> =
            Variant::ALL.iter().map(|variant| BatchNormStyle::Torchvision.params(Some(*variant))).collect();
        assert_eq!(params[..5], [BatchNormParams::TORCH_DEFAULT; 5]);
        assert_eq!(params[5..], [BatchNormParams::TF; 3]);
        for variant in [Some(Variant::B0), Some(Variant::B7), None] {
            assert_eq!(BatchNormStyle::Tf.params(variant), BatchNormParams::TF);
            assert_eq!(BatchNormStyle::Pytorch.params(variant), BatchNormParams::TORCH_DEFAULT);
        }
    }
}
