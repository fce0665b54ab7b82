//! Attaching a prompt-learning adapter to a model's [`PromptSite`](crate::prompt_site::PromptSite)
//! (PEFT's `_setup_prompt_encoder`), and PEFT's `TEXT` init.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::EncoderReparameterization;
use super::layer::{PromptAdapter, PromptHead, PromptKind, PromptSpec};
use crate::config::TaskType;
use crate::error::{PeftError, Result};
use crate::methods::AdapterConfig;
use crate::peft_model::PeftModel;
use crate::prompt_site::PromptGeometry;
use crate::site::AdapterHost;

/// The model's prompt geometry, or why it has none.
pub fn geometry<B: Backend, M: AdapterHost<B>>(host: &M) -> Result<PromptGeometry> {
    let mut g = None;
    host.visit_prompt(&mut |site| g = Some(site.geometry.clone()));
    g.ok_or_else(|| {
        PeftError::Unsupported(
            "prompt learning on this model: it has no prompt site (T5 and BERT have)".into(),
        )
    })
}

/// The adapter a prompt config describes on a model of `g`, and the config as PEFT saves it
/// (model fields filled in). Nothing is attached.
pub fn build<B: Backend>(
    name: &str,
    config: &AdapterConfig,
    g: &PromptGeometry,
    device: &B::Device,
) -> Result<(PromptAdapter<B>, AdapterConfig)> {
    let mut config = config.clone();
    let task = config.task_type();
    let inference = config.inference_mode();
    let (kind, head, hidden, lstm_layers, dropout) = match &mut config {
        AdapterConfig::PromptTuning(c) => {
            c.validate()?;
            c.common.resolve(g, task)?;
            (PromptKind::Input, PromptHead::None, g.token_dim, 0, 0.0)
        }
        AdapterConfig::PTuning(c) => {
            c.validate()?;
            c.common.resolve(g, task)?;
            let head = match c.encoder_reparameterization_type {
                EncoderReparameterization::Mlp => PromptHead::Mlp,
                EncoderReparameterization::Lstm => PromptHead::Lstm,
            };
            let h = *c.encoder_hidden_size.get_or_insert(g.token_dim);
            (
                PromptKind::Input,
                head,
                h,
                c.encoder_num_layers,
                c.encoder_dropout,
            )
        }
        AdapterConfig::PrefixTuning(c) => {
            c.validate()?;
            c.common.resolve(g, task)?;
            let head = if c.prefix_projection {
                PromptHead::Projection
            } else {
                PromptHead::None
            };
            let h = *c.encoder_hidden_size.get_or_insert(g.token_dim);
            (PromptKind::KeyValue, head, h, 0, 0.0)
        }
        _ => {
            return Err(PeftError::InvalidConfig(
                "not a prompt-learning config".into(),
            ));
        }
    };
    let common = config.prompt_common().expect("a prompt-learning config");
    if g.num_attention_heads == 0 || !g.token_dim.is_multiple_of(g.num_attention_heads) {
        return Err(PeftError::InvalidConfig(format!(
            "token_dim {} is not a multiple of num_attention_heads {}",
            g.token_dim, g.num_attention_heads
        )));
    }
    // Loaded for inference, PEFT keeps only the table (its saved output), whatever the method.
    let head = if inference { PromptHead::None } else { head };
    let spec = PromptSpec {
        kind,
        head,
        num_virtual_tokens: common.num_virtual_tokens,
        rows: if kind == PromptKind::Input {
            common.rows()
        } else {
            common.num_virtual_tokens
        },
        token_dim: g.token_dim,
        num_layers: g.num_layers,
        num_heads: g.num_attention_heads,
        hidden,
        lstm_layers,
    };
    Ok((PromptAdapter::new(name, spec, dropout, device), config))
}

/// Attaches prompt adapter `name` (`SEQ_CLS`: trainable copies of the classifier, as PEFT
/// adds). Returns the config as it will be saved.
pub fn attach<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    config: &AdapterConfig,
) -> Result<(Vec<String>, AdapterConfig)> {
    let g = geometry(host)?;
    let mut device = None;
    host.visit_linears(&mut |_, l| {
        device.get_or_insert_with(|| l.weight.lazy_device());
    });
    let device =
        device.ok_or_else(|| PeftError::InvalidConfig("the model has no layers".into()))?;
    let (adapter, mut config) = build::<B>(name, config, &g, &device)?;
    let task = config.task_type();
    let mut to_save: Vec<String> = Vec::new();
    let mts = &mut config
        .prompt_common_mut()
        .expect("build checked")
        .modules_to_save;
    if matches!(task, Some(TaskType::SeqCls | TaskType::TokenCls)) {
        let list = mts.get_or_insert_with(Vec::new);
        for h in ["classifier", "score"] {
            if !list.iter().any(|m| m == h) {
                list.push(h.to_string());
            }
        }
    }
    if let Some(list) = mts.as_ref() {
        for path in host.linear_paths() {
            if list.iter().any(|m| path.ends_with(m.as_str())) {
                to_save.push(path);
            }
        }
    }
    let mut result = Ok(());
    host.visit_prompt_mut(&mut |site| result = site.add(adapter.clone()));
    result?;
    let mut result = Ok(());
    host.visit_linears_mut(&mut |path, layer| {
        if result.is_ok() && to_save.iter().any(|t| t == path) {
            result = layer.add_saved_copy(name);
        }
    });
    if let Err(e) = result {
        host.visit_linears_mut(&mut |_, layer| {
            let _ = layer.delete(name);
        });
        host.visit_prompt_mut(&mut |site| site.delete(name));
        return Err(e);
    }
    Ok((to_save, config))
}

/// PEFT's `prompt_tuning_init = TEXT`: the table of prompt adapter `name` becomes the word
/// embeddings of `token_ids` (the tokenized `prompt_tuning_init_text`, special tokens included
/// as PEFT's tokenizer call adds them), cut to the table's rows or repeated to fill them.
pub fn init_from_token_ids<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    name: &str,
    token_ids: &[usize],
) -> Result<()> {
    let Some(words) = peft.base_model.word_embeddings() else {
        return Err(PeftError::Unsupported(
            "TEXT init on a model without word embeddings".into(),
        ));
    };
    if token_ids.is_empty() {
        return Err(PeftError::InvalidConfig(
            "prompt_tuning_init_text tokenizes to no tokens".into(),
        ));
    }
    let [vocab, _] = words.dims();
    if let Some(bad) = token_ids.iter().find(|t| **t >= vocab) {
        return Err(PeftError::InvalidConfig(format!(
            "token id {bad} of prompt_tuning_init_text is outside the vocabulary ({vocab})"
        )));
    }
    let mut found = false;
    let mut result = Ok(());
    peft.base_model.visit_prompt_mut(&mut |site| {
        let Some(a) = site.adapter_mut(name) else {
            return;
        };
        found = true;
        let rows = a.spec.rows;
        if a.embedding.lazy_shape().dims::<2>()[1] != words.dims()[1] {
            result = Err(PeftError::Unsupported(format!(
                "TEXT init of `{name}`: its table is not in the word-embedding space"
            )));
            return;
        }
        let ids: Vec<i64> = token_ids
            .iter()
            .cycle()
            .take(rows)
            .map(|t| *t as i64)
            .collect();
        let device = words.device();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows]), &device);
        let table = words.clone().select(0, idx);
        a.embedding = Param::initialized(a.embedding.id, table);
    });
    result?;
    if !found {
        return Err(PeftError::AdapterNotFound {
            name: name.to_string(),
            existing: peft.adapter_names().join(", "),
        });
    }
    let active = peft.active_adapters().to_vec();
    let names: Vec<&str> = active.iter().map(String::as_str).collect();
    peft.set_adapter(&names)
}

/// The parameter count of the adapter `config` describes on a model of `g`, without a model:
/// what PEFT's `print_trainable_parameters` counts for it.
pub fn parameter_count<B: Backend>(config: &AdapterConfig, g: &PromptGeometry) -> Result<usize> {
    use crate::params::AdapterParams;
    let device = Default::default();
    // Built, not attached: a model that refuses the adapter (its prompt site does) still counts
    // it, as PEFT creates it before it fails to run.
    let (a, _) = build::<B>("count", config, g, &device)?;
    Ok(a.param_count())
}
