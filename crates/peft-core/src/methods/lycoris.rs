//! What LoHa and LoKr share (PEFT's `LycorisConfig` and `LycorisLayer`): the config fields
//! common to both ([`LycorisCommon`], flattened into each config as PEFT's subclasses inherit
//! them), and the training-time module and rank dropout around a weight change.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::{
    LayersToTransform, OrderedMap, StringOrList, TargetModules, TaskType, de_null_false, ser_num,
    ser_num_map,
};
use crate::error::{PeftError, Result};
use crate::nn::linear;
use crate::targeting::{Targeting, pattern_value};

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// PEFT's `LycorisConfig` fields, shared by `LoHaConfig` and `LoKrConfig` (flattened into each,
/// so the files are PEFT's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LycorisCommon {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Alpha (scaling = alpha / r).
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub alpha: f64,
    /// In training, the probability of dropping each output row of the weight change.
    #[serde(default)]
    pub rank_dropout: f64,
    /// In training, the probability of skipping the adapter for a whole forward pass.
    #[serde(default)]
    pub module_dropout: f64,
    /// Conv layers only; no model here has them.
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_effective_conv2d: bool,
    /// Modules to adapt; `None` takes PEFT's default (LoRA's) for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
    /// Per-module ranks.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alphas.
    #[serde(default, serialize_with = "ser_num_map")]
    pub alpha_pattern: OrderedMap<f64>,
    /// Modules that get a trainable, saved copy (e.g. a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

impl Default for LycorisCommon {
    fn default() -> Self {
        LycorisCommon {
            r: default_r(),
            alpha: default_alpha(),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: OrderedMap::default(),
            alpha_pattern: OrderedMap::default(),
            modules_to_save: None,
        }
    }
}

impl LycorisCommon {
    /// Rank `r` and `alpha` on `target_modules`, PEFT's defaults elsewhere.
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LycorisCommon {
            r,
            alpha,
            target_modules: Some(target_modules),
            ..Default::default()
        }
    }

    /// `LycorisConfig.__post_init__`'s checks, and the ranges this crate requires.
    pub fn validate(&self, method: &'static str, task_type: Option<TaskType>) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(format!(
                "`r` should be a positive integer value but the value passed is {}",
                self.r
            )));
        }
        for (name, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(PeftError::InvalidConfig(format!(
                    "{name} must be in [0, 1), found {p}"
                )));
            }
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(PeftError::InvalidConfig(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            ));
        }
        self.targeting(method, task_type).validate()
    }

    /// Where the adapter attaches (LoRA's default targets when `target_modules` is unset).
    pub fn targeting(&self, method: &'static str, task_type: Option<TaskType>) -> Targeting {
        Targeting {
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            task_type,
            ..Targeting::new(
                method,
                self.target_modules.clone(),
                crate::targeting::default_lora_targets,
            )
        }
    }

    /// The rank for the module at `path` (`rank_pattern` first, then `r`).
    pub fn rank_for(&self, path: &str) -> Result<usize> {
        pattern_value(&self.rank_pattern, path, "rank_pattern", self.r)
    }

    /// The alpha for the module at `path` (`alpha_pattern` first, then `alpha`).
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        pattern_value(&self.alpha_pattern, path, "alpha_pattern", self.alpha)
    }
}

/// `x dW^T` for a weight change `dW` (`[out, in]`, PyTorch's layout, built only when used),
/// as `LycorisLayer.forward` applies it. In training (autodiff backends) the adapter is skipped
/// with probability `module_dropout` (`None`), and each output row of `dW` is dropped with
/// probability `rank_dropout`, the rows kept divided by the share kept when `rescale` (a weight
/// change left all zero when every row drops, where PEFT divides by zero). The draws come from
/// the seeded host stream of [`crate::dropout`].
pub(crate) fn delta_activations<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: impl FnOnce() -> Tensor<B, 2>,
    rank_dropout: f64,
    rescale: bool,
    module_dropout: f64,
) -> Option<Tensor<B, D>> {
    let device = x.device();
    let training = B::ad_enabled(&device);
    if training && module_dropout > 0.0 && crate::dropout::uniform(1)[0] <= module_dropout as f32 {
        return None;
    }
    let mut w = weight();
    if training && rank_dropout > 0.0 {
        let out = w.dims()[0];
        let mut keep: Vec<f32> = crate::dropout::uniform(out)
            .into_iter()
            .map(|u| if u > rank_dropout as f32 { 1.0 } else { 0.0 })
            .collect();
        let mean = keep.iter().sum::<f32>() / out as f32;
        if rescale && mean > 0.0 {
            keep.iter_mut().for_each(|k| *k /= mean);
        }
        w = w * Tensor::<B, 2>::from_data(TensorData::new(keep, [out, 1]), &device);
    }
    Some(linear(x, w.transpose(), None))
}
