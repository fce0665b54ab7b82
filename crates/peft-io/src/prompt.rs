//! Prompt-learning adapters in PEFT's files: `adapter_model.safetensors` holds
//! `prompt_embeddings` (the prompt encoder's output, `[rows, width]`) and the `modules_to_save`
//! copies under `base_model.<path>` (for prompt learning PEFT's `base_model` is the model
//! itself). PEFT discards the encoder (P-tuning's MLP or LSTM, prefix tuning's projection) when
//! it saves; so that a run can resume, a trainable encoder is also written to
//! `prompt_encoder.safetensors` (PyTorch names and layouts under `prompt_encoder.`), which PEFT
//! ignores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::PROMPT_ENCODER;
use peft_core::prompt::PromptHead;
use peft_core::{AdapterHost, PeftError, PeftModel};

use crate::adapter::open_adapter_weights;
use crate::error::{IoError, Result};
use crate::hf_model::LoadReport;
use crate::tensors::{F32Tensor, TensorSource, to_f32};

/// The file a trainable prompt encoder is kept in, next to the adapter.
pub const PROMPT_ENCODER_FILE: &str = "prompt_encoder.safetensors";
/// PEFT's key of a prompt adapter's output.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

fn head<B: Backend, M: AdapterHost<B>>(peft: &PeftModel<B, M>, name: &str) -> Option<PromptHead> {
    let mut h = None;
    peft.base_model
        .visit_prompt(&mut |site| h = site.adapter(name).map(|a| a.spec.head));
    h
}

/// The tensors PEFT saves for prompt adapter `name`.
pub(crate) fn prompt_state_dict<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> BTreeMap<String, F32Tensor> {
    let mut out = BTreeMap::new();
    peft.base_model.visit_prompt(&mut |site| {
        if let Some(a) = site.adapter(name) {
            out.insert(
                PROMPT_EMBEDDINGS.to_string(),
                to_f32::<B, 2>(a.saved_output()),
            );
        }
    });
    peft.visit_adapter_params(name, &mut |site, p| {
        if site != PROMPT_ENCODER
            && let Some(key) = file_key(site, p.key, false)
        {
            out.insert(key, p.param.to_file(&p.layout));
        }
    });
    out
}

/// The encoder of prompt adapter `name` (`prompt_encoder.<key>`), when it has one to keep.
pub(crate) fn encoder_state_dict<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> Option<BTreeMap<String, F32Tensor>> {
    if matches!(head(peft, name), None | Some(PromptHead::None)) {
        return None;
    }
    let mut out = BTreeMap::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        if site == PROMPT_ENCODER
            && let Some(key) = file_key(site, p.key, true)
        {
            out.insert(key, p.param.to_file(&p.layout));
        }
    });
    Some(out)
}

/// Where a prompt adapter's tensor `key` on `site` is read from: its `modules_to_save` copies
/// under `base_model.<site>`; the encoder's tensors from `prompt_encoder.safetensors` when it
/// has an encoder; otherwise its table from `prompt_embeddings` (and nothing else).
fn file_key(site: &str, key: &str, with_encoder: bool) -> Option<String> {
    if site != PROMPT_ENCODER {
        Some(format!("base_model.{site}.{key}"))
    } else if with_encoder {
        Some(format!("{PROMPT_ENCODER}.{key}"))
    } else {
        (key == "embedding.weight").then(|| PROMPT_EMBEDDINGS.to_string())
    }
}

/// Fills prompt adapter `name` from `dir`: its table from `prompt_embeddings` (an adapter
/// without an encoder: prompt tuning, or any method loaded for inference, as PEFT loads them),
/// or every encoder tensor from `prompt_encoder.safetensors` (a trainable encoder); and its
/// `modules_to_save` copies. Every tensor is read and checked before the model changes.
pub(crate) fn fill_prompt_adapter<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<LoadReport> {
    let main = open_adapter_weights(dir)?;
    let with_encoder = !matches!(head(peft, name), None | Some(PromptHead::None));
    let encoder = if with_encoder {
        let path = dir.join(PROMPT_ENCODER_FILE);
        if !path.exists() {
            let method = peft
                .adapter_config(name)
                .map_or("prompt", |c| c.peft_type());
            return Err(IoError::Peft {
                path: main.path(),
                source: PeftError::Unsupported(format!(
                    "{method} adapter `{name}` trains its encoder, but this directory holds only \
                     the encoder's output (`prompt_embeddings`, all PEFT saves) and no \
                     {PROMPT_ENCODER_FILE}; PEFT cannot train such an adapter further either: \
                     load it for inference"
                )),
            });
        }
        Some(TensorSource::safetensors(&path)?)
    } else {
        None
    };
    // (file key, from the encoder file, shape in the file)
    let mut wanted: Vec<(String, bool, Vec<usize>)> = Vec::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        if let Some(key) = file_key(site, p.key, with_encoder) {
            let shape = peft_core::params::file_shape(&p.param.shape(), &p.layout);
            wanted.push((key, with_encoder && site == PROMPT_ENCODER, shape));
        }
    });
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    let mut missing = Vec::new();
    for (key, from_encoder, want) in &wanted {
        let src = if *from_encoder {
            encoder.as_ref().expect("opened above")
        } else {
            &main
        };
        match src.get_f32(key)? {
            None => missing.push(key.clone()),
            Some((shape, v)) if &shape == want => {
                values.insert(key.clone(), v);
            }
            Some((shape, _)) => {
                return Err(IoError::ShapeMismatch {
                    path: src.path(),
                    key: key.clone(),
                    expected: want.clone(),
                    found: shape,
                });
            }
        }
    }
    if !missing.is_empty() {
        return Err(IoError::MissingKeys {
            path: if encoder.is_some() {
                dir.join(PROMPT_ENCODER_FILE)
            } else {
                main.path()
            },
            keys: missing,
        });
    }
    peft.visit_adapter_params_mut(name, &mut |site, mut p| {
        if let Some(v) = file_key(site, p.key, with_encoder).and_then(|k| values.remove(&k)) {
            let device = p.param.device();
            p.param.assign_file(v, &p.layout, &device);
        }
    });
    let mut known: HashSet<String> = wanted.into_iter().map(|(k, _, _)| k).collect();
    known.insert(PROMPT_EMBEDDINGS.to_string());
    let unused = main
        .names()
        .into_iter()
        .filter(|n| !known.contains(n))
        .collect();
    // Gradients follow the active set again (assigning made fresh parameters).
    let active = peft.active_adapters().to_vec();
    let names: Vec<&str> = active.iter().map(String::as_str).collect();
    peft.set_adapter(&names).map_err(|source| IoError::Peft {
        path: main.path(),
        source,
    })?;
    Ok(LoadReport {
        unused,
        newly_initialized: Vec::new(),
    })
}
