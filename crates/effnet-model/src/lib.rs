//! EfficientNet B0–B7 (and any compound coefficient phi) on libtorch through `tch`.
//!
//! # Layout
//! - [`scaling`]: compound scaling as pure functions (`round_channels`, `scale_depth`, the
//!   B0–B7 table, custom phi), re-exported from the libtorch-free `effnet-scaling` crate that
//!   the job spec and the command line read too.
//! - [`config`]: B0's stage table and the user's choices, turned into an [`Architecture`] with
//!   final per-block numbers (channels, kernel, stride, drop-path rate).
//! - [`blocks`]: `ConvBnAct`, squeeze-excitation, MBConv and stochastic depth.
//! - [`hooks`]: where a trainer reaches into the forward pass (SyncBatchNorm's sum across
//!   ranks, activation checkpointing), as traits the model calls.
//! - [`model`]: the network, its parameter count and multiply-add count.
//! - [`reference`]: published parameter counts, FLOPs and top-1 of B0–B7 (from `effnet-scaling`).
//! - [`weights`]: safetensors import (torchvision names, and timm names mapped onto them) and
//!   export.
//!
//! Data flows config → architecture → `EfficientNet::new(vs.root(), ...)`; variable names are
//! torchvision's state-dict keys, so exported torchvision weights load unchanged.

pub mod blocks;
pub mod config;
pub mod error;
pub mod hooks;
pub mod model;
pub mod scaling;
pub mod weights;

pub use blocks::stochastic_depth;
pub use config::{
    Architecture, BatchNormParams, BatchNormStyle, ClassifierInit, EfficientNetConfig, ModelSpec,
};
pub use effnet_scaling::reference;
pub use error::{Error, Result};
pub use hooks::{CrossReplica, ForwardHooks, Pass, Recompute};
pub use model::EfficientNet;
pub use scaling::{CompoundCoefficients, Scaling, Variant};
pub use weights::{KeyLayout, LoadReport, load_safetensors, save_safetensors};
