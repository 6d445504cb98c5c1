//! Weight import and export as `.safetensors`.
//!
//! The model's variable names are torchvision's state-dict keys, so a file saved from
//! `torchvision.models.efficientnet_bN().state_dict()` loads as it is. Files with timm's names
//! (`timm.create_model("efficientnet_bN")`) are translated onto them:
//!
//! | timm                                   | torchvision                          |
//! |----------------------------------------|--------------------------------------|
//! | `conv_stem`, `bn1`                     | `features.0.0`, `features.0.1`       |
//! | `blocks.S.I.*` (depthwise-separable, the stages without expansion): `conv_dw`, `bn1`, `se.conv_reduce`, `se.conv_expand`, `conv_pw`, `bn2` | `features.{S+1}.I.block.` `0.0`, `0.1`, `1.fc1`, `1.fc2`, `2.0`, `2.1` |
//! | `blocks.S.I.*` (inverted residual): `conv_pw`, `bn1`, `conv_dw`, `bn2`, `se.conv_reduce`, `se.conv_expand`, `conv_pwl`, `bn3` | `features.{S+1}.I.block.` `0.0`, `0.1`, `1.0`, `1.1`, `2.fc1`, `2.fc2`, `3.0`, `3.1` |
//! | `conv_head`, `bn2`                     | `features.8.0`, `features.8.1`       |
//! | `classifier`                           | `classifier.1`                       |
//!
//! A depthwise-separable block is recognised by having no `conv_pwl` tensor. BatchNorm's
//! `num_batches_tracked` counters are ignored; every other tensor must match a model variable
//! by name and shape, and every model variable must be present.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;
use tch::{Kind, Tensor, nn::VarStore};

use crate::config::B0_STAGES;
use crate::error::{Error, Result};

/// How the tensors in a file are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyLayout {
    /// Decide from the names: timm files have `conv_stem.weight`.
    Auto,
    Torchvision,
    Timm,
}

impl std::str::FromStr for KeyLayout {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(KeyLayout::Auto),
            "torchvision" => Ok(KeyLayout::Torchvision),
            "timm" => Ok(KeyLayout::Timm),
            other => Err(Error::BadInput {
                what: "key layout".into(),
                reason: format!("'{other}' is not one of auto, torchvision, timm"),
            }),
        }
    }
}

/// What a load did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    pub layout: KeyLayout,
    pub loaded: usize,
    /// Tensors in the file deliberately not used (`num_batches_tracked`).
    pub ignored: usize,
}

/// Load every variable of `vs` from a safetensors file, strictly (see the module docs).
/// Tensors are converted to each variable's dtype; nothing is modified unless all checks pass.
pub fn load_safetensors(vs: &VarStore, path: &Path, layout: KeyLayout) -> Result<LoadReport> {
    let unreadable = |reason: String| Error::UnreadableWeights { path: path.to_path_buf(), reason };
    if !path.is_file() {
        return Err(unreadable("no such file".into()));
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| unreadable(first_line(&e.to_string())))?;
    let names: HashSet<&str> = tensors.iter().map(|(name, _)| name.as_str()).collect();
    let layout = match layout {
        KeyLayout::Auto if names.contains("conv_stem.weight") => KeyLayout::Timm,
        KeyLayout::Auto => KeyLayout::Torchvision,
        chosen => chosen,
    };

    let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut ignored = 0;
    for (name, tensor) in &tensors {
        if name.ends_with("num_batches_tracked") {
            ignored += 1;
            continue;
        }
        let mapped = match layout {
            KeyLayout::Timm => timm_to_torchvision(name, &names)
                .ok_or_else(|| Error::UnexpectedTensor { path: path.to_path_buf(), name: name.clone() })?,
            _ => name.clone(),
        };
        if !tensor.is_floating_point() {
            return Err(Error::BadDtype {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: format!("{:?}", tensor.kind()),
            });
        }
        by_name.insert(mapped, tensor.shallow_clone());
    }

    let variables = vs.variables();
    // Check everything before touching a single variable.
    for (name, variable) in &variables {
        let source = by_name
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), name: name.clone() })?;
        if source.size() != variable.size() {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: variable.size(),
                found: source.size(),
            });
        }
    }
    if let Some(extra) = by_name.keys().find(|name| !variables.contains_key(*name)) {
        return Err(Error::UnexpectedTensor { path: path.to_path_buf(), name: extra.clone() });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut variable) in variables {
            let source = &by_name[&name];
            variable.f_copy_(&source.to_kind(variable.kind()).to_device(variable.device()))?;
        }
        Ok(())
    })?;
    Ok(LoadReport { layout, loaded: by_name.len(), ignored })
}

/// Save every variable of `vs` (parameters and BatchNorm running statistics) as float32
/// safetensors with torchvision's names.
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&tensors, path).map_err(|e| Error::UnreadableWeights {
        path: path.to_path_buf(),
        reason: first_line(&e.to_string()),
    })
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// Translate one timm key into the torchvision key, or `None` when it has no counterpart.
/// `names` is the whole file's key set, used to tell depthwise-separable blocks (no `conv_pwl`)
/// from inverted-residual ones.
pub fn timm_to_torchvision(key: &str, names: &HashSet<&str>) -> Option<String> {
    let head_index = B0_STAGES.len() + 1;
    let top_level = |rest: &str, prefix: &str| rest.strip_prefix(prefix).map(|s| s.to_string());
    if let Some(rest) = top_level(key, "conv_stem.") {
        return Some(format!("features.0.0.{rest}"));
    }
    if let Some(rest) = top_level(key, "bn1.") {
        return Some(format!("features.0.1.{rest}"));
    }
    if let Some(rest) = top_level(key, "conv_head.") {
        return Some(format!("features.{head_index}.0.{rest}"));
    }
    if let Some(rest) = top_level(key, "bn2.") {
        return Some(format!("features.{head_index}.1.{rest}"));
    }
    if let Some(rest) = top_level(key, "classifier.") {
        return Some(format!("classifier.1.{rest}"));
    }
    let rest = key.strip_prefix("blocks.")?;
    let mut parts = rest.splitn(3, '.');
    let stage: usize = parts.next()?.parse().ok()?;
    let block: usize = parts.next()?.parse().ok()?;
    let inner = parts.next()?;
    let inverted_residual = names.contains(format!("blocks.{stage}.{block}.conv_pwl.weight").as_str());
    let (layer, param) = if let Some(param) = inner.strip_prefix("se.conv_reduce.") {
        ("se.fc1", param)
    } else if let Some(param) = inner.strip_prefix("se.conv_expand.") {
        ("se.fc2", param)
    } else {
        inner.split_once('.')?
    };
    let target = if inverted_residual {
        match layer {
            "conv_pw" => "0.0",
            "bn1" => "0.1",
            "conv_dw" => "1.0",
            "bn2" => "1.1",
            "se.fc1" => "2.fc1",
            "se.fc2" => "2.fc2",
            "conv_pwl" => "3.0",
            "bn3" => "3.1",
            _ => return None,
        }
    } else {
        match layer {
            "conv_dw" => "0.0",
            "bn1" => "0.1",
            "se.fc1" => "1.fc1",
            "se.fc2" => "1.fc2",
            "conv_pw" => "2.0",
            "bn2" => "2.1",
            _ => return None,
        }
    };
    Some(format!("features.{}.{block}.block.{target}.{param}", stage + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names_map_onto_torchvision() {
        let keys = [
            "conv_stem.weight",
            "bn1.running_var",
            "blocks.0.0.conv_dw.weight",
            "blocks.0.0.se.conv_reduce.bias",
            "blocks.0.0.conv_pw.weight",
            "blocks.0.0.bn2.weight",
            "blocks.1.1.conv_pw.weight",
            "blocks.1.1.conv_pwl.weight",
            "blocks.1.1.bn3.bias",
            "blocks.1.1.se.conv_expand.weight",
            "conv_head.weight",
            "bn2.running_mean",
            "classifier.bias",
        ];
        let names: HashSet<&str> = keys.iter().copied().collect();
        let mapped: Vec<String> = keys.iter().map(|k| timm_to_torchvision(k, &names).unwrap()).collect();
        assert_eq!(
            mapped,
            [
                "features.0.0.weight",
                "features.0.1.running_var",
                "features.1.0.block.0.0.weight",
                "features.1.0.block.1.fc1.bias",
                "features.1.0.block.2.0.weight",
                "features.1.0.block.2.1.weight",
                "features.2.1.block.0.0.weight",
                "features.2.1.block.3.0.weight",
                "features.2.1.block.3.1.bias",
                "features.2.1.block.2.fc2.weight",
                "features.8.0.weight",
                "features.8.1.running_mean",
                "classifier.1.bias",
            ]
        );
        assert_eq!(timm_to_torchvision("blocks.0.0.unknown.weight", &names), None);
        assert_eq!(timm_to_torchvision("something_else", &names), None);
    }
}
