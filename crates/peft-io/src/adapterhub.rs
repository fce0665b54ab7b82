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

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use peft_core::bottleneck::{BottleneckAdapter, LayerNorm};
use peft_core::{AdapterConfig, AdapterHost, BnConfig, PeftModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{IoError, Result, io_err};
use crate::hf_model::LoadReport;
use crate::tensors::{F32Tensor, TensorSource, to_f32, write_atomic, write_safetensors};

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

/// Tensor names of one adapter at one site, relative to `<path>.adapters.<name>.`, with the
/// AdapterHub layout shape of each.
fn site_tensors<B: Backend>(a: &BottleneckAdapter<B>) -> Vec<(String, Vec<usize>)> {
    let hidden = a.down_weight.lazy_shape().dims::<2>()[0];
    let bn = a.bottleneck();
    let mut out = Vec::new();
    let lin = if a.norm_before.is_some() {
        out.push(("adapter_norm_before.weight".into(), vec![hidden]));
        out.push(("adapter_norm_before.bias".into(), vec![hidden]));
        "adapter_down.1"
    } else {
        "adapter_down.0"
    };
    out.push((format!("{lin}.weight"), vec![bn, hidden]));
    out.push((format!("{lin}.bias"), vec![bn]));
    out.push(("adapter_up.weight".into(), vec![hidden, bn]));
    out.push(("adapter_up.bias".into(), vec![hidden]));
    if a.norm_after.is_some() {
        out.push(("adapter_norm_after.weight".into(), vec![hidden]));
        out.push(("adapter_norm_after.bias".into(), vec![hidden]));
    }
    if let Some(s) = &a.learned_scaling {
        out.push(("scaling".into(), s.lazy_shape().dims::<1>().to_vec()));
    }
    out
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

fn t1<B: Backend>(values: Vec<f32>, shape: Vec<usize>, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn t2<B: Backend>(values: Vec<f32>, shape: Vec<usize>, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn set1<B: Backend>(p: &mut Param<Tensor<B, 1>>, t: Tensor<B, 1>) {
    *p = Param::initialized(p.id, t);
}

fn set2<B: Backend>(p: &mut Param<Tensor<B, 2>>, t: Tensor<B, 2>) {
    *p = Param::initialized(p.id, t);
}

fn set_tensor<B: Backend>(a: &mut BottleneckAdapter<B>, rel: &str, (shape, v): F32Tensor) {
    let device = a.down_weight.lazy_device();
    let norm = |n: &mut Option<LayerNorm<B>>, field: &str, t: Tensor<B, 1>| {
        if let Some(n) = n.as_mut() {
            if field == "weight" {
                set1(&mut n.weight, t);
            } else {
                set1(&mut n.bias, t);
            }
        }
    };
    match rel {
        "adapter_norm_before.weight" => norm(&mut a.norm_before, "weight", t1(v, shape, &device)),
        "adapter_norm_before.bias" => norm(&mut a.norm_before, "bias", t1(v, shape, &device)),
        "adapter_norm_after.weight" => norm(&mut a.norm_after, "weight", t1(v, shape, &device)),
        "adapter_norm_after.bias" => norm(&mut a.norm_after, "bias", t1(v, shape, &device)),
        "adapter_down.0.weight" | "adapter_down.1.weight" => {
            set2(&mut a.down_weight, t2(v, shape, &device).transpose())
        }
        "adapter_down.0.bias" | "adapter_down.1.bias" => {
            set1(&mut a.down_bias, t1(v, shape, &device))
        }
        "adapter_up.weight" => set2(&mut a.up_weight, t2(v, shape, &device).transpose()),
        "adapter_up.bias" => set1(&mut a.up_bias, t1(v, shape, &device)),
        "scaling" => {
            if let Some(s) = a.learned_scaling.as_mut() {
                set1(s, t1(v, shape, &device));
            }
        }
        _ => {}
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
    let mut wanted: Vec<(String, String, String, Vec<usize>)> = Vec::new();
    peft.base_model.visit_sublayers(&mut |site, adapters| {
        if let Some(a) = adapters.adapter(name) {
            for (rel, shape) in site_tensors(a) {
                let key = format!("{}.adapters.{file_name}.{rel}", site.path);
                wanted.push((site.path.clone(), rel, key, shape));
            }
        }
    });
    let mut by_site: HashMap<String, Vec<(String, F32Tensor)>> = HashMap::new();
    let mut missing = Vec::new();
    let mut used = HashSet::new();
    for (site, rel, key, shape) in wanted {
        let Some(found) = resolve_key(&names, &key) else {
            missing.push(key);
            continue;
        };
        let Some((got, values)) = source.get_f32(&found)? else {
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
        if rel.starts_with("adapter_norm_before") {
            used.insert(found.replace("adapter_norm_before", "adapter_down.0"));
        }
        used.insert(found);
        by_site.entry(site).or_default().push((rel, (got, values)));
    }
    if !missing.is_empty() {
        return Err(IoError::MissingKeys {
            path,
            keys: missing,
        });
    }
    peft.base_model.visit_sublayers_mut(&mut |site, adapters| {
        if let (Some(items), Some(a)) = (by_site.remove(&site.path), adapters.adapter_mut(name)) {
            for (rel, t) in items {
                set_tensor(a, &rel, t);
            }
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

/// The tensors of bottleneck adapter `name` as AdapterHub saves them (keys use `name`).
pub fn state_dict<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> BTreeMap<String, F32Tensor> {
    let mut out = BTreeMap::new();
    let v1 = to_f32::<B, 1>;
    let v2 = |t: Tensor<B, 2>| to_f32(t.transpose());
    peft.base_model.visit_sublayers(&mut |site, adapters| {
        let Some(a) = adapters.adapter(name) else {
            return;
        };
        let key = |rel: &str| format!("{}.adapters.{name}.{rel}", site.path);
        let lin = if let Some(n) = &a.norm_before {
            for k in ["adapter_norm_before", "adapter_down.0"] {
                out.insert(key(&format!("{k}.weight")), v1(n.weight.val()));
                out.insert(key(&format!("{k}.bias")), v1(n.bias.val()));
            }
            "adapter_down.1"
        } else {
            "adapter_down.0"
        };
        out.insert(key(&format!("{lin}.weight")), v2(a.down_weight.val()));
        out.insert(key(&format!("{lin}.bias")), v1(a.down_bias.val()));
        out.insert(key("adapter_up.weight"), v2(a.up_weight.val()));
        out.insert(key("adapter_up.bias"), v1(a.up_bias.val()));
        if let Some(n) = &a.norm_after {
            out.insert(key("adapter_norm_after.weight"), v1(n.weight.val()));
            out.insert(key("adapter_norm_after.bias"), v1(n.bias.val()));
        }
        if let Some(s) = &a.learned_scaling {
            out.insert(key("scaling"), v1(s.val()));
        }
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
