//! PEFT adapter directories: `adapter_config.json` with `adapter_model.safetensors` (or the
//! legacy `adapter_model.bin`), keys and shapes exactly as PEFT writes them.
//!
//! Keys, for adapter `name` on the layer at HF path `<path>` (the adapter name is stripped, as
//! PEFT does):
//! - `base_model.model.<path>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`,
//!   `lora_B.bias` `[out]` with `lora_bias`;
//! - `base_model.model.<path>.weight` / `.bias` for a `modules_to_save` copy;
//! - `base_model.model.<path>.base_layer.bias` (LoRA layers) or `<path>.bias` (others) for the
//!   biases `bias = "all" | "lora_only"` trains.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use peft_core::params::file_shape;
use peft_core::targeting::{ModelLinears, effective_targets};
use peft_core::{
    AdaptedLinear, AdapterConfig, AdapterHost, Bias, Ia3Config, LoraConfig, PeftError, PeftModel,
    TargetModules,
};
use serde_json::Value;

use crate::adapterhub::{self, AdapterHubConfig};

use crate::error::{IoError, Result, io_err};
use crate::hf_model::LoadReport;
use crate::tensors::{F32Tensor, TensorSource, to_f32, write_atomic, write_safetensors};

/// `adapter_config.json`.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// `adapter_model.safetensors`.
pub const ADAPTER_SAFETENSORS: &str = "adapter_model.safetensors";
/// `adapter_model.bin` (legacy).
pub const ADAPTER_BIN: &str = "adapter_model.bin";

const PREFIX: &str = "base_model.model.";

/// Reads and validates `dir/adapter_config.json`, whichever method wrote it: PEFT LoRA
/// (`peft_type: "LORA"`), PEFT IA3 (`"IA3"`) or an AdapterHub bottleneck adapter (a `config`
/// object). Other PEFT methods are refused by name.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    Ok(match read_dir_config(dir)? {
        DirConfig::Peft(c) => c,
        DirConfig::Hub(h) => AdapterConfig::Bottleneck(h.config),
    })
}

/// What `adapter_config.json` of a directory describes: a PEFT adapter, or an AdapterHub one
/// (whose file metadata, such as the name in its tensor keys, loading needs).
enum DirConfig {
    Peft(AdapterConfig),
    Hub(AdapterHubConfig),
}

/// Reads `dir/adapter_config.json` once and parses it in the format it is in.
fn read_dir_config(dir: &Path) -> Result<DirConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = crate::files::read_json_text(&path)?;
    let value: Value = serde_json::from_str(&text).map_err(|source| IoError::Json {
        path: path.clone(),
        source,
    })?;
    if adapterhub::is_adapterhub_config(&value) {
        return Ok(DirConfig::Hub(adapterhub::parse_value(&path, value)?));
    }
    let peft_err = |source| IoError::Peft {
        path: path.clone(),
        source,
    };
    match value.get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => {
            let config: LoraConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::Lora(config)))
        }
        Some("IA3") => {
            let config: Ia3Config = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::Ia3(config)))
        }
        Some("LOHA") => {
            let config: peft_core::LoHaConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::LoHa(config)))
        }
        Some("LOKR") => {
            let config: peft_core::LoKrConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::LoKr(config)))
        }
        Some("PROMPT_TUNING") => {
            let config: peft_core::PromptTuningConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::PromptTuning(config)))
        }
        Some("P_TUNING") => {
            let config: peft_core::PromptEncoderConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::PTuning(config)))
        }
        Some("PREFIX_TUNING") => {
            let config: peft_core::PrefixTuningConfig = crate::files::parse_json(&path, &text)?;
            config.validate().map_err(peft_err)?;
            Ok(DirConfig::Peft(AdapterConfig::PrefixTuning(config)))
        }
        Some(other) => Err(peft_err(PeftError::Unsupported(format!(
            "peft_type {other:?} (implemented: LORA, IA3, LOHA, LOKR, PROMPT_TUNING, P_TUNING, \
             PREFIX_TUNING, and AdapterHub bottleneck adapters)"
        )))),
    }
}

/// The adapter weights of `dir`: safetensors first, then the legacy `.bin`.
pub fn open_adapter_weights(dir: &Path) -> Result<TensorSource> {
    open_first(dir, ADAPTER_SAFETENSORS, ADAPTER_BIN)
}

/// `dir/<safetensors>` if it exists, else `dir/<bin>` (through the pickle gate), else an error
/// naming both.
pub(crate) fn open_first(dir: &Path, safetensors: &str, bin: &str) -> Result<TensorSource> {
    let st = dir.join(safetensors);
    if st.exists() {
        return TensorSource::safetensors(&st);
    }
    let b = dir.join(bin);
    if b.exists() {
        return TensorSource::pytorch(&b);
    }
    Err(IoError::NoWeights {
        dir: dir.to_path_buf(),
        looked: format!("{safetensors}, {bin}"),
    })
}

/// The biases `bias = "all" | "lora_only"` makes adapter `name` train and save, as
/// (PEFT key, layer path): the base layer's own `bias` (`base_layer.bias` on LoRA layers). They
/// belong to the base model, not to an adapter, so they are not in the adapters' tensor lists.
fn base_bias_keys<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> Vec<(String, String)> {
    let bias = peft.adapter_config(name).map_or(Bias::None, |c| c.bias());
    let mut out = Vec::new();
    if bias == Bias::None {
        return out;
    }
    peft.base_model
        .visit_linears(&mut |path, layer: &AdaptedLinear<B>| {
            let has_lora = layer.adapter(name).is_some();
            if layer.saved_copy(name).is_none()
                && layer.bias.is_some()
                && (bias == Bias::All || has_lora)
            {
                let k = if layer.lora.is_empty() {
                    "bias"
                } else {
                    "base_layer.bias"
                };
                out.push((format!("{PREFIX}{path}.{k}"), path.to_string()));
            }
        });
    out
}

/// Loads adapter `name` from `dir` into `peft` (PEFT's `load_adapter`): reads the config,
/// attaches the adapter, and fills its tensors. Missing tensors and shape mismatches are
/// errors naming the file and key; tensors the model has no place for are reported.
pub fn load_adapter<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<LoadReport> {
    match read_dir_config(dir)? {
        DirConfig::Hub(h) => adapterhub::load_with(peft, dir, &h, Some(name)).map(|(_, r)| r),
        DirConfig::Peft(mut config) => {
            config.set_inference_mode(true);
            add_and_fill(peft, &dir.join(ADAPTER_CONFIG), name, config, |p| {
                fill_adapter(p, dir, name)
            })
        }
    }
}

/// Attaches adapter `name` with `config` (errors name `cfg_path`), then runs `fill`; if filling
/// fails, the half-loaded adapter is removed again.
pub(crate) fn add_and_fill<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    cfg_path: &Path,
    name: &str,
    config: impl Into<AdapterConfig>,
    fill: impl FnOnce(&mut PeftModel<B, M>) -> Result<LoadReport>,
) -> Result<LoadReport> {
    peft.add_adapter(name, config)
        .map_err(|source| IoError::Peft {
            path: cfg_path.to_path_buf(),
            source,
        })?;
    fill(peft).inspect_err(|_| {
        let _ = peft.delete_adapter(name);
    })
}

/// Replaces the tensors of the existing adapter `name` with those in `dir` (keeping parameter
/// identities, e.g. to resume training); the config in `dir` is not read.
pub fn load_adapter_weights<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<LoadReport> {
    if matches!(
        peft.adapter_config(name),
        Some(AdapterConfig::Bottleneck(_))
    ) {
        return adapterhub::load_adapter_weights(peft, dir, name);
    }
    fill_adapter(peft, dir, name)
}

fn fill_adapter<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dir: &Path,
    name: &str,
) -> Result<LoadReport> {
    if peft
        .adapter_config(name)
        .is_some_and(AdapterConfig::is_prompt_learning)
    {
        return crate::prompt::fill_prompt_adapter(peft, dir, name);
    }
    let source = open_adapter_weights(dir)?;
    let path = source.path();
    // Read and check every tensor before touching the model, so a bad file changes nothing.
    let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        let shape = file_shape(&p.param.shape(), &p.layout);
        wanted.push((format!("{PREFIX}{site}.{}", p.key), shape));
    });
    let bias_keys = base_bias_keys(peft, name);
    let mut biases: HashMap<String, Vec<usize>> = HashMap::new();
    peft.base_model.visit_linears(&mut |p, layer| {
        if let Some(b) = &layer.bias {
            biases.insert(p.to_string(), b.lazy_shape().to_vec());
        }
    });
    for (key, layer) in &bias_keys {
        wanted.push((key.clone(), biases[layer].clone()));
    }
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    let mut missing = Vec::new();
    for (key, want) in &wanted {
        match source.get_f32(key)? {
            None => missing.push(key.clone()),
            Some((shape, v)) if &shape == want => {
                values.insert(key.clone(), v);
            }
            Some((shape, _)) => {
                return Err(IoError::ShapeMismatch {
                    path,
                    key: key.clone(),
                    expected: want.clone(),
                    found: shape,
                });
            }
        }
    }
    if !missing.is_empty() {
        return Err(IoError::MissingKeys {
            path,
            keys: missing,
        });
    }
    peft.visit_adapter_params_mut(name, &mut |site, mut p| {
        let key = format!("{PREFIX}{site}.{}", p.key);
        if let Some(v) = values.remove(&key) {
            let device = p.param.device();
            p.param.assign_file(v, &p.layout, &device);
        }
    });
    let bias_layers: HashMap<String, String> = bias_keys.into_iter().map(|(k, l)| (l, k)).collect();
    peft.base_model.visit_linears_mut(&mut |p, layer| {
        if let Some(v) = bias_layers.get(p).and_then(|k| values.remove(k)) {
            let device = layer.weight.lazy_device();
            let n = v.len();
            let t = Tensor::<B, 1>::from_data(TensorData::new(v, vec![n]), &device);
            layer.bias = Some(Param::from_tensor(t).set_require_grad(false));
        }
    });
    let known: HashSet<String> = wanted.into_iter().map(|(k, _)| k).collect();
    let unused = source
        .names()
        .into_iter()
        .filter(|n| !known.contains(n))
        .collect();
    Ok(LoadReport {
        unused,
        newly_initialized: Vec::new(),
    })
}

/// PEFT's `PeftModel.from_pretrained(model, dir)`: the model with the adapter of `dir` attached
/// under `name`, active and frozen (inference mode).
///
/// ```
/// use burn::backend::NdArray;
/// let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5");
/// let device = Default::default();
/// let (base, _) = peft_io::load_t5::<NdArray>(&fixtures.join("mt5"), &device)?;
/// let (peft, report) = peft_io::from_pretrained(base, &fixtures.join("mt5_lora"), "default")?;
/// assert!(report.unused.is_empty());
/// assert_eq!(peft.active_adapters(), ["default"]);
/// assert_eq!(peft.parameter_counts().trainable, 0); // loaded for inference
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn from_pretrained<B: Backend, M: AdapterHost<B>>(
    model: M,
    dir: &Path,
    name: &str,
) -> Result<(PeftModel<B, M>, LoadReport)> {
    let mut config = match read_dir_config(dir)? {
        DirConfig::Hub(h) => return adapterhub::from_pretrained_with(model, dir, &h, name),
        DirConfig::Peft(c) => c,
    };
    config.set_inference_mode(true);
    let mut peft = PeftModel::new(model, config, name).map_err(|source| IoError::Peft {
        path: dir.join(ADAPTER_CONFIG),
        source,
    })?;
    let report = fill_adapter(&mut peft, dir, name)?;
    Ok((peft, report))
}

/// The tensors adapter `name` saves, by PEFT key, in PEFT's layout (`[out, in]`).
pub fn adapter_state_dict<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> BTreeMap<String, F32Tensor> {
    if peft
        .adapter_config(name)
        .is_some_and(AdapterConfig::is_prompt_learning)
    {
        return crate::prompt::prompt_state_dict(peft, name);
    }
    let mut out = BTreeMap::new();
    peft.visit_adapter_params(name, &mut |site, p| {
        out.insert(
            format!("{PREFIX}{site}.{}", p.key),
            p.param.to_file(&p.layout),
        );
    });
    let bias_keys = base_bias_keys(peft, name);
    peft.base_model.visit_linears(&mut |p, layer| {
        for (key, layer_path) in &bias_keys {
            if layer_path == p {
                let b = layer.bias.as_ref().expect("listed with a bias");
                out.insert(key.clone(), to_f32::<B, 1>(b.val()));
            }
        }
    });
    out
}

/// The config PEFT would write for adapter `name`: inference mode on, default targets resolved.
pub fn saved_config<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> Option<LoraConfig> {
    let mut config = peft.lora_config(name)?.clone();
    config.header.inference_mode = true;
    if config.target_modules.is_none() {
        config.target_modules = resolved_targets(peft, &config.targeting());
    }
    Some(config)
}

/// The target list PEFT writes when `target_modules` was left to the model type's default.
fn resolved_targets<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    targeting: &peft_core::Targeting,
) -> Option<TargetModules> {
    let linears = peft.base_model.linear_paths();
    let heads = peft.base_model.output_heads(targeting.task_type);
    let model = ModelLinears {
        linears: &linears,
        model_type: peft.base_model.model_type(),
        output_heads: &heads,
    };
    match effective_targets(targeting, &model) {
        Ok(TargetModules::List(l)) => Some(TargetModules::List(l)),
        _ => None,
    }
}

/// The IA3 config PEFT would write for adapter `name`: inference mode on, default targets and
/// feed-forward modules resolved.
pub fn saved_ia3_config<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
) -> Option<Ia3Config> {
    let Some(AdapterConfig::Ia3(c)) = peft.adapter_config(name) else {
        return None;
    };
    let mut config = c.clone();
    config.header.inference_mode = true;
    let model_type = peft.base_model.model_type();
    if config.target_modules.is_none()
        && let Some(d) = model_type.and_then(peft_core::ia3::default_ia3_targets)
    {
        config.target_modules = Some(TargetModules::list(d.iter().copied()));
    }
    if config.feedforward_modules.is_none() {
        config.feedforward_modules = config.effective_feedforward(model_type).ok();
    }
    Some(config)
}

/// PEFT's `save_pretrained`: every adapter, `default` in `dir`, others in `dir/<name>/`, each as
/// `adapter_config.json` + `adapter_model.safetensors` (metadata `format: pt`); bottleneck
/// adapters in AdapterHub's format (`adapter_config.json` + `adapter.safetensors`). Files are
/// written to a temporary name and renamed, so a crash never leaves a half-written adapter.
///
/// ```
/// use burn::backend::NdArray;
/// use peft_core::{LoraConfig, PeftModel, TargetModules};
/// let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5");
/// let (base, _) = peft_io::load_t5::<NdArray>(&fixtures.join("mt5"), &Default::default())?;
/// let peft = PeftModel::new(base, LoraConfig::new(4, 8.0, TargetModules::list(["q", "v"])), "default")
///     .expect("targets exist");
/// let dir = std::env::temp_dir().join(format!("peft-io-doc-{}", std::process::id()));
/// let written = peft_io::save_pretrained(&peft, &dir)?;
/// assert_eq!(written, [dir.clone()]);
/// assert!(dir.join("adapter_config.json").exists() && dir.join("adapter_model.safetensors").exists());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn save_pretrained<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for name in peft.adapter_names() {
        let out = if name == "default" {
            dir.to_path_buf()
        } else {
            dir.join(&name)
        };
        if matches!(
            peft.adapter_config(&name),
            Some(AdapterConfig::Bottleneck(_))
        ) {
            written.push(adapterhub::save_adapter(peft, &out, &name)?);
            continue;
        }
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let tensors = adapter_state_dict(peft, &name);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&out.join(ADAPTER_SAFETENSORS), &tensors, metadata)?;
        // LoHa and LoKr: inference mode on, default targets resolved, as PEFT writes them.
        macro_rules! lycoris_json {
            ($c:expr) => {{
                let mut c = $c.clone();
                c.header.inference_mode = true;
                if c.common.target_modules.is_none() {
                    c.common.target_modules = resolved_targets(peft, &c.targeting());
                }
                c.to_json()
            }};
        }
        if let Some(encoder) = crate::prompt::encoder_state_dict(peft, &name) {
            write_safetensors(
                &out.join(crate::prompt::PROMPT_ENCODER_FILE),
                &encoder,
                HashMap::from([("format".to_string(), "pt".to_string())]),
            )?;
        }
        macro_rules! prompt_json {
            ($c:expr) => {{
                let mut c = $c.clone();
                c.header.inference_mode = true;
                c.to_json()
            }};
        }
        let json = match (saved_ia3_config(peft, &name), peft.adapter_config(&name)) {
            (Some(c), _) => c.to_json(),
            (None, Some(AdapterConfig::PromptTuning(c))) => prompt_json!(c),
            (None, Some(AdapterConfig::PTuning(c))) => prompt_json!(c),
            (None, Some(AdapterConfig::PrefixTuning(c))) => prompt_json!(c),
            (None, Some(AdapterConfig::LoHa(c))) => lycoris_json!(c),
            (None, Some(AdapterConfig::LoKr(c))) => lycoris_json!(c),
            _ => saved_config(peft, &name).expect("adapter exists").to_json(),
        };
        let cfg_path = out.join(ADAPTER_CONFIG);
        write_atomic(&cfg_path, json.as_bytes())?;
        written.push(out);
    }
    Ok(written)
}
