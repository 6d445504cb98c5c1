//! Table 2 of the EfficientNet paper: ImageNet top-1/top-5, parameters and FLOPs of B0–B7 and the
//! published models the paper groups with each of them. The EfficientNet rows' top-1 and FLOPs
//! are also in `effnet_scaling::Reference` (which `effnet model` prints); a test ties the two.

use serde::{Deserialize, Serialize};

/// Where the reference rows come from.
pub const SOURCE: &str = "Tan & Le, \"EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks\", \
ICML 2019 (arXiv:1905.11946), Table 2: ImageNet validation, single crop, single model";

/// One row of the paper's table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaperRow {
    pub model: &'static str,
    /// The EfficientNet this row is grouped with (the row of similar top-1 the ratios refer to).
    pub group: &'static str,
    pub top1: f64,
    pub top5: f64,
    /// Parameters and FLOPs (multiply-adds) as the paper prints them (rounded).
    pub params: f64,
    pub flops: Option<f64>,
    /// The ratios the paper prints (to its EfficientNet row of the group).
    pub printed_params_ratio: f64,
    pub printed_flops_ratio: Option<f64>,
}

const M: f64 = 1e6;
const B: f64 = 1e9;

#[allow(clippy::too_many_arguments)]
const fn row(
    model: &'static str,
    group: &'static str,
    top1: f64,
    top5: f64,
    params: f64,
    flops: Option<f64>,
    printed_params_ratio: f64,
    printed_flops_ratio: Option<f64>,
) -> PaperRow {
    PaperRow { model, group, top1, top5, params, flops, printed_params_ratio, printed_flops_ratio }
}

/// The table in the paper's order.
pub const TABLE2: [PaperRow; 24] = [
    row("EfficientNet-B0", "EfficientNet-B0", 0.771, 0.933, 5.3 * M, Some(0.39 * B), 1.0, Some(1.0)),
    row("ResNet-50", "EfficientNet-B0", 0.760, 0.930, 26.0 * M, Some(4.1 * B), 4.9, Some(11.0)),
    row("DenseNet-169", "EfficientNet-B0", 0.762, 0.932, 14.0 * M, Some(3.5 * B), 2.6, Some(8.9)),
    row("EfficientNet-B1", "EfficientNet-B1", 0.791, 0.944, 7.8 * M, Some(0.70 * B), 1.0, Some(1.0)),
    row("ResNet-152", "EfficientNet-B1", 0.778, 0.938, 60.0 * M, Some(11.0 * B), 7.6, Some(16.0)),
    row("DenseNet-264", "EfficientNet-B1", 0.779, 0.939, 34.0 * M, Some(6.0 * B), 4.3, Some(8.6)),
    row("Inception-v3", "EfficientNet-B1", 0.788, 0.944, 24.0 * M, Some(5.7 * B), 3.0, Some(8.1)),
    row("Xception", "EfficientNet-B1", 0.790, 0.945, 23.0 * M, Some(8.4 * B), 3.0, Some(12.0)),
    row("EfficientNet-B2", "EfficientNet-B2", 0.801, 0.949, 9.2 * M, Some(1.0 * B), 1.0, Some(1.0)),
    row("Inception-v4", "EfficientNet-B2", 0.800, 0.950, 48.0 * M, Some(13.0 * B), 5.2, Some(13.0)),
    row("Inception-ResNet-v2", "EfficientNet-B2", 0.801, 0.951, 56.0 * M, Some(13.0 * B), 6.1, Some(13.0)),
    row("EfficientNet-B3", "EfficientNet-B3", 0.816, 0.957, 12.0 * M, Some(1.8 * B), 1.0, Some(1.0)),
    row("ResNeXt-101", "EfficientNet-B3", 0.809, 0.956, 84.0 * M, Some(32.0 * B), 7.0, Some(18.0)),
    row("PolyNet", "EfficientNet-B3", 0.813, 0.958, 92.0 * M, Some(35.0 * B), 7.7, Some(19.0)),
    row("EfficientNet-B4", "EfficientNet-B4", 0.829, 0.964, 19.0 * M, Some(4.2 * B), 1.0, Some(1.0)),
    row("SENet", "EfficientNet-B4", 0.827, 0.962, 146.0 * M, Some(42.0 * B), 7.7, Some(10.0)),
    row("NASNet-A", "EfficientNet-B4", 0.827, 0.962, 89.0 * M, Some(24.0 * B), 4.7, Some(5.7)),
    row("AmoebaNet-A", "EfficientNet-B4", 0.828, 0.961, 87.0 * M, Some(23.0 * B), 4.6, Some(5.5)),
    row("PNASNet", "EfficientNet-B4", 0.829, 0.962, 86.0 * M, Some(25.0 * B), 4.5, Some(6.0)),
    row("EfficientNet-B5", "EfficientNet-B5", 0.836, 0.967, 30.0 * M, Some(9.9 * B), 1.0, Some(1.0)),
    row("AmoebaNet-C", "EfficientNet-B5", 0.835, 0.965, 155.0 * M, Some(41.0 * B), 5.2, Some(4.1)),
    row("EfficientNet-B6", "EfficientNet-B6", 0.840, 0.968, 43.0 * M, Some(19.0 * B), 1.0, Some(1.0)),
    row("EfficientNet-B7", "EfficientNet-B7", 0.843, 0.970, 66.0 * M, Some(37.0 * B), 1.0, Some(1.0)),
    row("GPipe", "EfficientNet-B7", 0.843, 0.970, 557.0 * M, None, 8.4, None),
];

impl PaperRow {
    pub fn is_efficientnet(&self) -> bool {
        self.model == self.group
    }
}

/// The paper's EfficientNet row named `model` (`EfficientNet-B3`).
pub fn efficientnet(model: &str) -> Option<&'static PaperRow> {
    TABLE2.iter().find(|row| row.is_efficientnet() && row.model.eq_ignore_ascii_case(model))
}

/// The EfficientNet row of similar accuracy: the smallest one whose top-1 is at least `top1`, else
/// B7 (the paper's own grouping: each model sits with the EfficientNet that matches or beats it).
pub fn efficientnet_of_similar_accuracy(top1: f64) -> &'static PaperRow {
    let mut rows = TABLE2.iter().filter(|row| row.is_efficientnet());
    rows.clone()
        .find(|row| row.top1 >= top1)
        .or_else(|| rows.next_back())
        .expect("the table has EfficientNets")
}

/// A reference row as the report stores it, with the ratios computed from the table's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRow {
    pub model: String,
    pub group: String,
    pub efficientnet: bool,
    pub top1: f64,
    pub top5: f64,
    pub params: f64,
    pub flops: Option<f64>,
    /// Parameters and FLOPs relative to the group's EfficientNet.
    pub params_ratio: f64,
    pub flops_ratio: Option<f64>,
}

pub fn reference_rows() -> Vec<ReferenceRow> {
    TABLE2
        .iter()
        .map(|row| {
            let base = efficientnet(row.group).expect("every group is an EfficientNet row");
            ReferenceRow {
                model: row.model.to_string(),
                group: row.group.to_string(),
                efficientnet: row.is_efficientnet(),
                top1: row.top1,
                top5: row.top5,
                params: row.params,
                flops: row.flops,
                params_ratio: row.params / base.params,
                flops_ratio: row.flops.zip(base.flops).map(|(f, b)| f / b),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ratios computed from the table's rounded figures agree with the ratios the paper prints
    /// (which it computed from unrounded ones) to within that rounding: a typo in a row shows here.
    #[test]
    fn computed_ratios_match_the_printed_ones() {
        for (row, computed) in TABLE2.iter().zip(reference_rows()) {
            let close = |a: f64, b: f64| (a / b - 1.0).abs() < 0.06;
            assert!(
                close(computed.params_ratio, row.printed_params_ratio),
                "{}: params ratio {:.2} vs printed {}",
                row.model,
                computed.params_ratio,
                row.printed_params_ratio
            );
            match (computed.flops_ratio, row.printed_flops_ratio) {
                (Some(c), Some(p)) => {
                    assert!(close(c, p), "{}: FLOPs ratio {c:.2} vs printed {p}", row.model)
                }
                (None, None) => {}
                other => panic!("{}: FLOPs ratio {other:?}", row.model),
            }
        }
    }

    /// `effnet model` prints the paper's top-1 and FLOPs from `effnet_scaling`'s references, the
    /// report from this table: the two copies of the paper's EfficientNet rows must agree.
    #[test]
    fn efficientnet_rows_agree_with_the_scaling_crates_references() {
        for variant in effnet_scaling::Variant::ALL {
            let reference = variant.reference();
            let row = efficientnet(&format!("EfficientNet-{}", variant.name().to_uppercase()))
                .unwrap_or_else(|| panic!("no row for {variant}"));
            assert!((row.top1 * 100.0 - reference.paper_top1).abs() < 1e-9, "{variant}: top-1");
            let flops = row.flops.expect("EfficientNet rows have FLOPs");
            assert!((flops / 1e9 - reference.paper_gflops).abs() < 1e-9, "{variant}: FLOPs");
            // The paper's rounded parameter counts against torchvision's exact ones.
            let params = reference.parameters as f64;
            assert!((row.params / params - 1.0).abs() < 0.06, "{variant}: {} vs {params}", row.params);
        }
    }

    #[test]
    fn groups_are_the_efficientnet_of_similar_accuracy() {
        // Every comparison model sits with an EfficientNet at least as accurate, and the
        // EfficientNet before it is less accurate: the rule `efficientnet_of_similar_accuracy` applies.
        for row in TABLE2.iter().filter(|r| !r.is_efficientnet()) {
            assert_eq!(efficientnet_of_similar_accuracy(row.top1).model, row.group, "{}", row.model);
        }
        assert_eq!(efficientnet_of_similar_accuracy(0.5).model, "EfficientNet-B0");
        assert_eq!(efficientnet_of_similar_accuracy(0.80).model, "EfficientNet-B2");
        assert_eq!(efficientnet_of_similar_accuracy(0.99).model, "EfficientNet-B7");
        assert_eq!(TABLE2.iter().filter(|r| r.is_efficientnet()).count(), 8);
    }
}
