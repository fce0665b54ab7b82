//! Attaching a LoRA adapter to a model (PEFT's `LoraModel._create_and_replace`).

use burn::tensor::backend::Backend;

use super::config::LoraConfig;
use super::layer::{LoraAdapter, LoraSpec};
use crate::error::Result;
use crate::peft_model::attach_linear;
use crate::site::AdapterHost;

/// Attaches LoRA adapter `name` to every layer `config` targets, and trainable copies to its
/// `modules_to_save` (the task's heads added, as PEFT does). Returns the targeted paths and the
/// config as it will be saved.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &LoraConfig,
) -> Result<(Vec<String>, LoraConfig)> {
    config.validate()?;
    let weight_init = super::init::WeightInit::parse(&config.init_lora_weights)?;
    let targeting = config.targeting().with_task_heads();
    let targets = attach_linear(host, name, &targeting, |layer, path, device| {
        let spec = LoraSpec {
            r: config.rank_for(path)?,
            alpha: config.alpha_for(path)?,
            dropout: config.lora_dropout,
            use_rslora: config.use_rslora,
            init: config.init_lora_weights.clone(),
            lora_bias: config.lora_bias,
            use_dora: config.use_dora,
        };
        let mut adapter = LoraAdapter::new(name, layer.d_input(), layer.d_output(), &spec, device);
        if let Some(init) = weight_init {
            super::init::apply(init, layer, &mut adapter, path)?;
        }
        layer.add_lora(adapter)
    })?;
    let saved = LoraConfig {
        modules_to_save: targeting.modules_to_save,
        ..config.clone()
    };
    Ok((targets, saved))
}
