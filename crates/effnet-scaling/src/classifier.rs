//! How the classifier's weights start.

use serde::{Deserialize, Serialize};

/// How the classifier's weights start. The paper's (and torchvision's) uniform
/// `±1/sqrt(classes)` is sized for 1000 classes: with 10 the initial logits are ten times larger
/// and the first steps are spent shrinking them, so small-class jobs may start from zero.
/// Serialised as job files spell it: `uniform`, `zero`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierInit {
    #[default]
    Uniform,
    Zero,
}
