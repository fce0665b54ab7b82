//! Attaching a LoHa adapter to a model (PEFT's `LoHaModel._create_and_replace`).

use burn::tensor::backend::Backend;

use super::config::LoHaConfig;
use super::layer::LohaAdapter;
use crate::error::Result;
use crate::peft_model::attach_linear;
use crate::site::AdapterHost;

/// Attaches LoHa adapters named `name` to every layer `config` targets, and trainable copies to
/// its `modules_to_save` (the task's heads added). Returns the targeted paths and the config as
/// it will be saved.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &LoHaConfig,
) -> Result<(Vec<String>, LoHaConfig)> {
    config.validate()?;
    let targeting = config.targeting().with_task_heads();
    let targets = attach_linear(host, name, &targeting, |layer, path, device| {
        let adapter = LohaAdapter::new(
            name,
            layer.d_input(),
            layer.d_output(),
            config.common.rank_for(path)?,
            config.common.alpha_for(path)?,
            config.common.rank_dropout,
            config.common.module_dropout,
            config.init_weights,
            device,
        );
        layer.add_loha(adapter)
    })?;
    let mut saved = config.clone();
    saved.common.modules_to_save = targeting.modules_to_save;
    Ok((targets, saved))
}
