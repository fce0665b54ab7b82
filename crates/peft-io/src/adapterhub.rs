//! AdapterHub (`adapters` library) bottleneck adapter directories: `adapter_config.json` (the
//! `BnConfig` under `config`, with `hidden_size`, `model_class`, `model_type`, `name`,
//! `version`) and `adapter.safetensors` (or `pytorch_adapter.bin`), in both directions.
//!
//! Keys, for the adapter saved as `<name>` at the sub-layer with HF path `<path>`:
//! - `<path>.adapters.<name>.adapter_down.0.weight` `[bottleneck, hidden]` and `.bias`
//!   (`adapter_down.1.*` when `ln_before` puts a LayerNorm at index 0, which is then also
//!   written as `adapter_norm_before.*`, as PyTorch's state dict has it twice);
//! - `<path>.adapters.<name>.adapter_up.weight` `[hidden, bottleneck]` and `.bias`;
//! - `<path>.adapters.<name>.adapter_norm_after.{weight,bias}` (`ln_after`);
//! - `<path>.adapters.<name>.scaling` (`scaling = "learned"` or `"channel"`).
//!
//! A model's base-model prefix (`bert.`) may be present in a file and absent in the model, or
//! the other way round, as AdapterHub's loader allows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use peft_core::params::file_shape;
use peft_core::{AdapterConfig, AdapterHost, BnConfig, PeftModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{IoError, Result, io_err};
use crate::hf_model::LoadReport;
use crate::tensors::{F32Tensor, TensorSource, write_atomic, write_safetensors};

/// `adapter_config.json` (the same name PEFT uses).
pub const CONFIG: &str = "adapter_config.json";
/// `adapter.safetensors`.
pub const SAFETENSORS: &str = "adapter.safetensors";
/// `pytorch_adapter.bin` (legacy).
pub const BIN: &str = "pytorch_adapter.bin";
/// The AdapterHub version whose file format this module reads and writes.
pub const FORMAT_VERSION: &str = "adapters.1.3.0";

/// AdapterHub's `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterHubConfig {
    /// The adapter's configuration.
    pub config: BnConfig,
    /// Hidden size of the model it was trained on.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// Class of the model it was trained on (`BertModel`, `T5ForConditionalGeneration`).
    #[serde(default)]
    pub model_class: Option<String>,
    /// Name or path of the model it was trained on.
    #[serde(default)]
    pub model_name: Option<String>,
    /// `model_type` of the model it was trained on (`bert`, `t5`, `mt5`).
    #[serde(default)]
    pub model_type: Option<String>,
    /// The adapter's name (the `<name>` in its tensor keys).
    pub name: String,
    /// `adapters.<version>`.
    #[serde(default)]
    pub version: Option<String>,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Whether `dir/adapter_config.json` is an AdapterHub config (a `config` object, no
/// `peft_type`).
pub fn is_adapterhub_config(value: &Value) -> bool {
    value
        .get("config")
        .is_some_and(|c| c.is_object() || c.is_string())
        && value.get("peft_type").is_none()
}

/// Parses an AdapterHub `adapter_config.json` body (already read from `path`) and validates it.
pub fn parse_config(path: &Path, text: &str) -> Result<AdapterHubConfig> {
    let value: Value = serde_json::from_str(text).map_err(|source| IoError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    parse_value(path, value)
}

/// [`parse_config`] on an already parsed JSON value.
pub(crate) fn parse_value(path: &Path, mut value: Value) -> Result<AdapterHubConfig> {
    // The architecture decides the method: only bottleneck adapters live here.
    let arch = value["config"]
        .get("architecture")
        .and_then(Value::as_str)
        .unwrap_or("bottleneck")
        .to_string();
    if arch != "bottleneck" {
        return Err(IoError::Peft {
            path: path.to_path_buf(),
            source: peft_core::PeftError::Unsupported(format!(
                "AdapterHub adapter architecture {arch:?} (only \"bottleneck\" adapters: \
                 Houlsby/double_seq_bn, Pfeiffer/seq_bn and other BnConfigs)"
            )),
        });
    }
    // AdapterHub's loader: files without `version` predate the activation renaming, and their
    // "gelu" means the tanh approximation (`ACTIVATION_RENAME`).
    if value.get("version").is_none()
        && let Some(nl) = value["config"].get("non_linearity").and_then(Value::as_str)
    {
        let renamed = match nl {
            "gelu" => Some("gelu_new"),
            "gelu_orig" => Some("gelu"),
            _ => None,
        };
        if let Some(r) = renamed {
            value["config"]["non_linearity"] = Value::from(r);
        }
    }
    // Older AdapterHub files may name the preset instead of spelling out the config.
    if let Some(preset) = value["config"].as_str() {
        let c = BnConfig::preset(preset).ok_or_else(|| IoError::Peft {
            path: path.to_path_buf(),
            source: peft_core::PeftError::Unsupported(format!("AdapterHub config {preset:?}")),
        })?;
        value["config"] = serde_json::to_value(c).expect("BnConfig serialises");
    }
    let config: AdapterHubConfig =
        serde_json::from_value(value).map_err(|source| IoError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    config.config.validate().map_err(|source| IoError::Peft {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(config)
}

/// Reads and validates `dir/adapter_config.json` as an AdapterHub config.
pub fn read_config(dir: &Path) -> Result<AdapterHubConfig> {
    let path = dir.join(CONFIG);
    let text = crate::files::read_json_text(&path)?;
    parse_config(&path, &text)
}

/// The adapter weights of `dir`: `adapter.safetensors` first, then `pytorch_adapter.bin`.
pub fn open_weights(dir: &Path) -> Result<TensorSource> {
    crate::adapter::open_first(dir, SAFETENSORS, BIN)
}

/// Finds `key` in a file whose keys may carry (or lack) the model's base-model prefix.
fn resolve_key(names: &HashSet<String>, key: &str) -> Option<String> {
    if names.contains(key) {
        return Some(key.to_string());
    }
    // The model has a prefix (`bert.encoder...`) the file lacks.
    if let Some((_, rest)) = key.split_once('.')
        && names.contains(rest)
    {
        return Some(rest.to_string());
    }
    // The file has a prefix the model lacks: a unique `<prefix>.<key>`.
    let suffix = format!(".{key}");
    let mut hits = names.iter().filter(|n| n.ends_with(&suffix));
    match (hits.next(), hits.next()) {
        (Some(h), None) if !h[..h.len() - suffix.len()].contains('.') => Some(h.clone()),
        _ => None,
    }
}

/// Fills the tensors of the existing bottleneck adapter `name` from `dir`, whose keys use
/// `file_name`. Missing tensors and shape mismatches are errors naming the file and key.
fn fill<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
    file_name: &str,
) -> Result<LoadReport> {
    let source = open_weights(dir)?;
    let path = source.path();
    let names: HashSet<String> = source.names().into_iter().collect();
    // Read and check every tensor before touching the model, so a bad file changes nothing.
    let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        let key = format!("{site}.adapters.{file_name}.{}", p.key);
        wanted.push((key, file_shape(&p.param.shape(), &p.layout)));
    });
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    let mut missing = Vec::new();
    let mut used = HashSet::new();
    for (key, shape) in wanted {
        let Some(found) = resolve_key(&names, &key) else {
            missing.push(key);
            continue;
        };
        let Some((got, v)) = source.get_f32(&found)? else {
            missing.push(key);
            continue;
        };
        if got != shape {
            return Err(IoError::ShapeMismatch {
                path,
                key: found,
                expected: shape,
                found: got,
            });
        }
        // `adapter_down.0.*` duplicates `adapter_norm_before.*` when `ln_before` is set.
        if key.contains(".adapter_norm_before.") {
            used.insert(found.replace("adapter_norm_before", "adapter_down.0"));
        }
        used.insert(found);
        values.insert(key, v);
    }
    if !missing.is_empty() {
        return Err(IoError::MissingKeys {
            path,
            keys: missing,
        });
    }
    peft.visit_adapter_params_mut(name, &mut |site, mut p| {
        let key = format!("{site}.adapters.{file_name}.{}", p.key);
        if let Some(v) = values.remove(&key) {
            let device = p.param.device();
            p.param.assign_file(v, &p.layout, &device);
        }
    });
    let unused = names.into_iter().filter(|n| !used.contains(n)).collect();
    Ok(LoadReport {
        unused,
        newly_initialized: Vec::new(),
    })
}

/// Refuses an adapter trained on another model type or hidden size than `model`'s.
fn check_model<B: Backend, M: AdapterHost<B>>(
    model: &M,
    cfg_path: &Path,
    config: &AdapterHubConfig,
) -> Result<()> {
    if let (Some(theirs), Some(ours)) = (&config.model_type, model.model_type())
        && theirs != ours
        && !(matches!(theirs.as_str(), "t5" | "mt5") && matches!(ours, "t5" | "mt5"))
    {
        return Err(IoError::Peft {
            path: cfg_path.to_path_buf(),
            source: peft_core::PeftError::InvalidConfig(format!(
                "the adapter was trained on a {theirs:?} model, this model is {ours:?}"
            )),
        });
    }
    let mut hidden = None;
    model.visit_sublayers(&mut |s, _| hidden = hidden.or(Some(s.hidden)));
    if let (Some(theirs), Some(ours)) = (config.hidden_size, hidden)
        && theirs != ours
    {
        return Err(IoError::Peft {
            path: cfg_path.to_path_buf(),
            source: peft_core::PeftError::InvalidConfig(format!(
                "hidden_size mismatch: the adapter expects {theirs}, the model has {ours}"
            )),
        });
    }
    Ok(())
}

/// Fills the bottleneck adapter `name` (already attached from `config`) from `dir` and freezes it,
/// as loading an adapter for inference does.
fn fill_frozen<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
    config: &AdapterHubConfig,
) -> Result<LoadReport> {
    let report = fill(peft, dir, name, &config.name)?;
    peft.set_frozen(name, true)
        .map_err(|source| IoError::Peft {
            path: dir.join(CONFIG),
            source,
        })?;
    Ok(report)
}

/// AdapterHub's `model.load_adapter(dir)`: attaches the bottleneck adapter of `dir` to `peft`
/// under `name` (default: the name in its config), inactive and frozen, and fills its tensors.
/// Returns the name used and what the file held that the model has no place for.
pub fn load_adapter<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: Option<&str>,
) -> Result<(String, LoadReport)> {
    load_with(peft, dir, &read_config(dir)?, name)
}

/// [`load_adapter`] with the config of `dir` already read.
pub(crate) fn load_with<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    config: &AdapterHubConfig,
    name: Option<&str>,
) -> Result<(String, LoadReport)> {
    let cfg_path = dir.join(CONFIG);
    check_model(&peft.base_model, &cfg_path, config)?;
    let name = name.unwrap_or(&config.name).to_string();
    let report =
        crate::adapter::add_and_fill(peft, &cfg_path, &name, config.config.clone(), |p| {
            fill_frozen(p, dir, &name, config)
        })?;
    Ok((name, report))
}

/// `from_pretrained` for an AdapterHub directory whose config is already read: `model` with the
/// adapter attached under `name`, active and frozen.
pub(crate) fn from_pretrained_with<B: Backend, M: AdapterHost<B>>(
    model: M,
    dir: &Path,
    config: &AdapterHubConfig,
    name: &str,
) -> Result<(PeftModel<B, M>, LoadReport)> {
    let cfg_path = dir.join(CONFIG);
    check_model(&model, &cfg_path, config)?;
    let mut peft =
        PeftModel::new(model, config.config.clone(), name).map_err(|source| IoError::Peft {
            path: cfg_path,
            source,
        })?;
    let report = fill_frozen(&mut peft, dir, name, config)?;
    Ok((peft, report))
}

/// Replaces the tensors of the existing bottleneck adapter `name` with those in `dir` (keeping
/// parameter identities, e.g. to resume training).
pub fn load_adapter_weights<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<LoadReport> {
    let config = read_config(dir)?;
    fill(peft, dir, name, &config.name)
}

/// The tensors of bottleneck adapter `name` as AdapterHub saves them (keys use `name`; an
/// `ln_before` LayerNorm also under `adapter_down.0.*`, as AdapterHub's `Sequential` names it).
pub fn state_dict<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> BTreeMap<String, F32Tensor> {
    let mut out = BTreeMap::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        let key = format!("{site}.adapters.{name}.{}", p.key);
        let value = p.param.to_file(&p.layout);
        if key.contains(".adapter_norm_before.") {
            out.insert(
                key.replace("adapter_norm_before", "adapter_down.0"),
                value.clone(),
            );
        }
        out.insert(key, value);
    });
    out
}

/// The `adapter_config.json` AdapterHub would write for bottleneck adapter `name`.
pub fn saved_config<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> Option<AdapterHubConfig> {
    let Some(AdapterConfig::Bottleneck(c)) = peft.adapter_config(name) else {
        return None;
    };
    let mut hidden = None;
    peft.base_model
        .visit_sublayers(&mut |s, _| hidden = hidden.or(Some(s.hidden)));
    Some(AdapterHubConfig {
        config: c.clone(),
        hidden_size: hidden,
        model_class: peft.base_model.model_class().map(str::to_string),
        model_name: None,
        model_type: peft.base_model.model_type().map(str::to_string),
        name: name.to_string(),
        version: Some(FORMAT_VERSION.to_string()),
        extra: Map::new(),
    })
}

/// AdapterHub's `model.save_adapter(dir, name)`: `adapter_config.json` + `adapter.safetensors`,
/// each written to a temporary file and renamed.
pub fn save_adapter<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<PathBuf> {
    let config = saved_config(peft, name).ok_or_else(|| IoError::Peft {
        path: dir.to_path_buf(),
        source: peft_core::PeftError::AdapterNotFound {
            name: name.to_string(),
            existing: peft.adapter_names().join(", "),
        },
    })?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors = state_dict(peft, name);
    write_safetensors(&dir.join(SAFETENSORS), &tensors, HashMap::new())?;
    let json = serde_json::to_string_pretty(&config).expect("config serialises");
    write_atomic(&dir.join(CONFIG), json.as_bytes())?;
    Ok(dir.to_path_buf())
}
