//! Hugging Face model directories: `config.json` plus `model.safetensors`,
//! `model.safetensors.index.json` (sharded) or `pytorch_model.bin`.

use std::collections::HashSet;
use std::path::Path;

use burn::tensor::backend::Backend;
use peft_models::{HfParams, T5Config, T5ForConditionalGeneration};

use crate::error::{IoError, Result, io_err};
use crate::tensors::TensorSource;

/// What loading a state dict found besides the tensors it used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors in the file that the model has no place for (transformers' "unexpected keys").
    pub unused: Vec<String>,
    /// Parameters absent from the file that keep their fresh initialisation (a new task head).
    pub newly_initialized: Vec<String>,
}

/// Tensors transformers writes that no model here uses (kept out of the unused list).
const IGNORED: &[&str] =
    &["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"];

/// Buffers transformers saves that are not parameters (`embeddings.position_ids`).
fn is_buffer(name: &str) -> bool {
    IGNORED.contains(&name) || name.ends_with("position_ids")
}

/// Assigns every parameter of `model` from `source` by its transformers name. Tied names
/// (`encoder.embed_tokens.weight` for `shared.weight`, ...) are accepted in place of each other.
/// Checkpoints with or without the model's `base_model_prefix` (`bert.`) both load. A missing
/// tensor or a shape mismatch is an error naming the file and the key, except for task heads the
/// model allows to start fresh (listed in the report).
pub fn load_hf_weights<B: Backend, M: HfParams<B>>(
    model: &mut M,
    source: &TensorSource,
) -> Result<LoadReport> {
    let path = source.path();
    let aliases = model.tied_aliases();
    let prefix = model.base_model_prefix();
    let names: HashSet<String> = source.names().into_iter().collect();
    let mut newly_initialized = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    let mut missing = Vec::new();
    let mut first_err: Option<IoError> = None;
    model.visit_hf_params_mut(&mut |name, slot| {
        if first_err.is_some() {
            return;
        }
        let mut candidates = vec![name.to_string()];
        for (alias, canonical) in &aliases {
            if *canonical == name {
                candidates.push(alias.to_string());
            }
        }
        if let Some(p) = prefix {
            match name.strip_prefix(&format!("{p}.")) {
                Some(bare) => candidates.push(bare.to_string()),
                None => candidates.push(format!("{p}.{name}")),
            }
        }
        candidates.retain(|c| names.contains(c));
        for cand in &candidates {
            match source.get_f32(cand) {
                Ok(Some((shape, values))) => {
                    let expected = slot.hf_shape();
                    if shape != expected {
                        first_err = Some(IoError::ShapeMismatch {
                            path: path.clone(),
                            key: cand.clone(),
                            expected,
                            found: shape,
                        });
                        return;
                    }
                    let device = slot.device();
                    slot.set(values, &device);
                    used.extend(candidates.iter().cloned());
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    first_err = Some(e);
                    return;
                }
            }
        }
        missing.push(name.to_string());
    });
    for name in std::mem::take(&mut missing) {
        if model.may_be_newly_initialized(&name) {
            newly_initialized.push(name);
        } else {
            missing.push(name);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if !missing.is_empty() {
        return Err(IoError::MissingKeys {
            path,
            keys: missing,
        });
    }
    let unused = source
        .names()
        .into_iter()
        .filter(|n| !used.contains(n) && !is_buffer(n))
        .collect();
    Ok(LoadReport {
        unused,
        newly_initialized,
    })
}

/// The weights of a model directory: `model.safetensors`, else the sharded index, else
/// `pytorch_model.bin`.
pub fn open_weights(dir: &Path) -> Result<TensorSource> {
    let st = dir.join("model.safetensors");
    if st.exists() {
        return TensorSource::safetensors(&st);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return TensorSource::sharded(&index);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return TensorSource::pytorch(&bin);
    }
    Err(IoError::NoWeights {
        dir: dir.to_path_buf(),
        looked: "model.safetensors, model.safetensors.index.json, pytorch_model.bin".into(),
    })
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::files::read_json_text(path)?;
    serde_json::from_str(&text).map_err(|source| IoError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The `model_type` of a model directory's `config.json`.
pub fn model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    json.get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| IoError::Model {
            path,
            source: peft_models::ModelError::Config("config.json has no `model_type`".into()),
        })
}

/// Reads a T5/mT5 `config.json`.
pub fn read_t5_config(dir: &Path) -> Result<T5Config> {
    let path = dir.join("config.json");
    let text = crate::files::read_json_text(&path)?;
    T5Config::from_json(&text).map_err(|source| IoError::Model { path, source })
}

/// Reads a BERT `config.json`.
pub fn read_bert_config(dir: &Path) -> Result<peft_models::BertConfig> {
    let path = dir.join("config.json");
    let text = crate::files::read_json_text(&path)?;
    peft_models::BertConfig::from_json(&text).map_err(|source| IoError::Model { path, source })
}

/// Loads a BERT directory as `BertModel` (with its pooler when the checkpoint has one).
///
/// ```
/// use burn::backend::NdArray;
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert/bert_cls");
/// let (bert, report) = peft_io::load_bert::<NdArray>(&dir, &Default::default())?;
/// assert!(report.newly_initialized.is_empty());
/// assert_eq!(bert.config.hidden_size, 32);
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn load_bert<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(peft_models::BertModel<B>, LoadReport)> {
    crate::auto::load_pretrained(dir, device)
}

/// Loads a BERT directory as `BertForSequenceClassification`; a checkpoint without a classifier
/// (a bare encoder) gets a fresh one, reported in `newly_initialized`.
pub fn load_bert_classifier<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(peft_models::BertForSequenceClassification<B>, LoadReport)> {
    crate::auto::load_pretrained(dir, device)
}

/// Loads a T5/mT5/mt0 directory as transformers would.
///
/// ```
/// use burn::backend::NdArray;
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/mt5");
/// let (t5, report) = peft_io::load_t5::<NdArray>(&dir, &Default::default())?;
/// assert!(report.unused.is_empty() && report.newly_initialized.is_empty());
/// assert_eq!(t5.config.model_type, "mt5");
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn load_t5<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(T5ForConditionalGeneration<B>, LoadReport)> {
    crate::auto::load_pretrained(dir, device)
}

/// Files of a model directory that describe its tokenizer, copied along with merged models.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.txt",
    "generation_config.json",
];

/// The state dict of `model` under transformers' names and layouts.
pub fn hf_state_dict<B: Backend, M: HfParams<B>>(
    model: &mut M,
) -> std::collections::BTreeMap<String, crate::tensors::F32Tensor> {
    let mut out = std::collections::BTreeMap::new();
    model.visit_hf_params_mut(&mut |name, slot| {
        out.insert(name.to_string(), slot.values());
    });
    out
}

/// Writes `model` as a Hugging Face model directory that transformers loads as it is:
/// `config.json` (the given JSON), `model.safetensors` (metadata `format: pt`), and the tokenizer
/// files found in `copy_from`.
pub fn save_hf_model<B: Backend, M: HfParams<B>>(
    model: &mut M,
    config_json: &serde_json::Value,
    dir: &Path,
    copy_from: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors = hf_state_dict(model);
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::tensors::write_safetensors(&dir.join("model.safetensors"), &tensors, metadata)?;
    let config = serde_json::to_string_pretty(config_json).expect("JSON value serialises");
    crate::tensors::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    if let Some(src) = copy_from {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.exists() {
                let bytes = crate::files::read_limited(
                    &from,
                    crate::files::MAX_TOKENIZER_BYTES,
                    "a tokenizer file",
                )?;
                crate::tensors::write_atomic(&dir.join(f), &bytes)?;
            }
        }
    }
    Ok(())
}
