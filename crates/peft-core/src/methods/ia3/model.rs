//! Attaching an IA3 adapter to a model (PEFT's `IA3Model._create_and_replace`).

use burn::tensor::backend::Backend;

use super::config::{Ia3Config, is_feedforward};
use super::layer::Ia3Adapter;
use crate::error::Result;
use crate::peft_model::attach_linear;
use crate::site::AdapterHost;

/// Attaches IA3 vectors named `name` to every layer `config` targets (input scaling on its
/// feed-forward modules), and trainable copies to its `modules_to_save` (the task's heads
/// added, as PEFT does). Returns the targeted paths and the config as it will be saved.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &Ia3Config,
) -> Result<(Vec<String>, Ia3Config)> {
    config.validate()?;
    let model_type = host.model_type().map(str::to_string);
    let targeting = config.targeting().with_task_heads();
    let ff = config.effective_feedforward(model_type.as_deref())?;
    let targets = attach_linear(host, name, &targeting, |layer, path, device| {
        let feedforward = is_feedforward(&ff, path)?;
        let len = if feedforward {
            layer.d_input()
        } else {
            layer.d_output()
        };
        layer.add_ia3(Ia3Adapter::new(
            name,
            len,
            feedforward,
            config.init_ia3_weights,
            device,
        ))
    })?;
    let saved = Ia3Config {
        modules_to_save: targeting.modules_to_save,
        ..config.clone()
    };
    Ok((targets, saved))
}
