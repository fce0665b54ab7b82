//! Attaching a LoKr adapter to a model (PEFT's `LoKrModel._create_and_replace`).

use burn::tensor::backend::Backend;

use super::config::LoKrConfig;
use super::layer::{LokrAdapter, LokrSpec};
use crate::error::Result;
use crate::peft_model::attach_linear;
use crate::site::AdapterHost;

/// Attaches LoKr adapters named `name` to every layer `config` targets, and trainable copies to
/// its `modules_to_save` (the task's heads added). Returns the targeted paths and the config as
/// it will be saved.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &LoKrConfig,
) -> Result<(Vec<String>, LoKrConfig)> {
    config.validate()?;
    let init = config.init()?;
    let targeting = config.targeting().with_task_heads();
    let targets = attach_linear(host, name, &targeting, |layer, path, device| {
        let spec = LokrSpec {
            r: config.common.rank_for(path)?,
            alpha: config.common.alpha_for(path)?,
            decompose_both: config.decompose_both,
            decompose_factor: config.decompose_factor,
            rank_dropout: config.common.rank_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
            module_dropout: config.common.module_dropout,
            init,
        };
        let adapter = LokrAdapter::new(name, layer.d_input(), layer.d_output(), &spec, device);
        layer.add_lokr(adapter)
    })?;
    let mut saved = config.clone();
    saved.common.modules_to_save = targeting.modules_to_save;
    Ok((targets, saved))
}
