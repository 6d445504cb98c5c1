//! Published reference numbers for the named variants, in one place.
//!
//! - Parameters: torchvision's `efficientnet_bN(num_classes=1000)`, counted with
//!   `sum(p.numel() for p in model.parameters())`.
//! - FLOPs and top-1: the EfficientNet paper, Table 2 (arXiv 1905.11946v5). The paper's
//!   "FLOPs" are multiply-adds at the variant's resolution.

use serde::Serialize;

use crate::scaling::Variant;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Reference {
    pub variant: Variant,
    /// Trainable parameters with 1000 classes (torchvision).
    pub parameters: i64,
    /// Billions of multiply-adds at the variant's resolution (paper, Table 2).
    pub paper_gflops: f64,
    /// ImageNet top-1 accuracy in percent (paper, Table 2).
    pub paper_top1: f64,
}

impl Variant {
    pub fn reference(self) -> Reference {
        let (parameters, paper_gflops, paper_top1) = match self {
            Variant::B0 => (5_288_548, 0.39, 77.1),
            Variant::B1 => (7_794_184, 0.70, 79.1),
            Variant::B2 => (9_109_994, 1.0, 80.1),
            Variant::B3 => (12_233_232, 1.8, 81.6),
            Variant::B4 => (19_341_616, 4.2, 82.9),
            Variant::B5 => (30_389_784, 9.9, 83.6),
            Variant::B6 => (43_040_704, 19.0, 84.0),
            Variant::B7 => (66_347_960, 37.0, 84.3),
        };
        Reference { variant: self, parameters, paper_gflops, paper_top1 }
    }
}
