//! `add_weighted_adapter` on adapter files (`peft merge-adapters`): several PEFT LoRA adapter
//! directories in, one out, with no base model: every site's factors are read from the files
//! and combined by [`WeightedMerge`] (see `peft_core::methods::lora::weighted`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use peft_core::methods::lora::weighted::{SiteLora, WeightedMerge, site_scaling};
use peft_core::{AdapterConfig, LoraConfig, PeftError};

use crate::adapter::{
    ADAPTER_CONFIG, ADAPTER_SAFETENSORS, open_adapter_weights, read_adapter_config,
};
use crate::error::{IoError, Result, io_err};
use crate::tensors::{F32Tensor, write_atomic, write_safetensors};

const PREFIX: &str = "base_model.model.";

/// What [`merge_adapter_dirs`] made: the new adapter's config and tensors (PEFT keys and
/// layout), ready for [`save_lora_adapter`].
#[derive(Clone, Debug)]
pub struct MergedAdapter {
    /// The new adapter's config.
    pub config: LoraConfig,
    /// Its tensors by PEFT key.
    pub tensors: BTreeMap<String, F32Tensor>,
    /// The sites, in key order.
    pub sites: Vec<String>,
}

/// One input adapter's factors, by site.
struct Input {
    dir: PathBuf,
    config: LoraConfig,
    sites: BTreeMap<String, (F32Tensor, F32Tensor)>,
}

/// Reads one LoRA adapter directory: its config and every `lora_A`/`lora_B` pair.
fn read_input(dir: &Path) -> Result<Input> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let config = match read_adapter_config(dir)? {
        AdapterConfig::Lora(c) => c,
        other => {
            return Err(IoError::Peft {
                path: cfg_path,
                source: PeftError::Unsupported(format!(
                    "add_weighted_adapter combines LoRA adapters; this one is {}",
                    other.peft_type()
                )),
            });
        }
    };
    let source = open_adapter_weights(dir)?;
    let file = source.path();
    let mut halves: BTreeMap<String, (Option<F32Tensor>, Option<F32Tensor>)> = BTreeMap::new();
    for key in source.names() {
        let rest = key.strip_prefix(PREFIX).unwrap_or(&key);
        let (site, is_a) = if let Some(s) = rest.strip_suffix(".lora_A.weight") {
            (s, true)
        } else if let Some(s) = rest.strip_suffix(".lora_B.weight") {
            (s, false)
        } else {
            return Err(IoError::Peft {
                path: file.clone(),
                source: PeftError::Unsupported(format!(
                    "tensor `{key}`: add_weighted_adapter combines lora_A and lora_B only"
                )),
            });
        };
        let t = source.get_f32(&key)?.ok_or_else(|| IoError::MissingKeys {
            path: file.clone(),
            keys: vec![key.clone()],
        })?;
        if t.0.len() != 2 {
            return Err(IoError::ShapeMismatch {
                path: file.clone(),
                key: key.clone(),
                expected: vec![0, 0],
                found: t.0.clone(),
            });
        }
        let slot = halves.entry(site.to_string()).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let mut sites = BTreeMap::new();
    for (site, pair) in halves {
        match pair {
            (Some(a), Some(b)) => {
                let (r, _) = site_scaling(&config, &site).map_err(|source| IoError::Peft {
                    path: cfg_path.clone(),
                    source,
                })?;
                if a.0[0] != r || b.0[1] != a.0[0] {
                    return Err(IoError::ShapeMismatch {
                        path: file.clone(),
                        key: format!("{PREFIX}{site}.lora_B.weight"),
                        expected: vec![b.0[0], r],
                        found: b.0.clone(),
                    });
                }
                sites.insert(site, (a, b));
            }
            (a, _) => {
                let half = if a.is_some() { "lora_B" } else { "lora_A" };
                return Err(IoError::MissingKeys {
                    path: file.clone(),
                    keys: vec![format!("{PREFIX}{site}.{half}.weight")],
                });
            }
        }
    }
    Ok(Input {
        dir: dir.to_path_buf(),
        config,
        sites,
    })
}

/// PEFT's `add_weighted_adapter` over adapter directories: the LoRA adapters in `dirs`,
/// combined with `weights` by `merge`.
///
/// ```
/// use peft_core::methods::lora::weighted::{CombinationType, WeightedMerge};
/// let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
/// let a = fixtures.join("t5/mt5_lora");
/// let merged = peft_io::weighted::merge_adapter_dirs(
///     &[a.as_path(), a.as_path()],
///     &[0.5, 0.5],
///     &WeightedMerge::new(CombinationType::Cat),
/// )?;
/// assert_eq!(merged.config.r, 2 * peft_io::read_adapter_config(&a)?.as_lora().unwrap().r);
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn merge_adapter_dirs(
    dirs: &[&Path],
    weights: &[f64],
    merge: &WeightedMerge,
) -> Result<MergedAdapter> {
    let first_cfg = dirs
        .first()
        .map(|d| d.join(ADAPTER_CONFIG))
        .unwrap_or_default();
    let peft = |path: PathBuf| move |source| IoError::Peft { path, source };
    if dirs.len() != weights.len() {
        return Err(peft(first_cfg)(PeftError::InvalidConfig(format!(
            "{} weights for {} adapters",
            weights.len(),
            dirs.len()
        ))));
    }
    let inputs = dirs
        .iter()
        .map(|d| read_input(d))
        .collect::<Result<Vec<_>>>()?;
    let configs: Vec<&LoraConfig> = inputs.iter().map(|i| &i.config).collect();
    let (config, _) = merge
        .merged_config(&configs)
        .map_err(peft(first_cfg.clone()))?;
    let new_rank = config.r;
    let mut all_sites: Vec<&String> = inputs.iter().flat_map(|i| i.sites.keys()).collect();
    all_sites.sort();
    all_sites.dedup();
    let mut tensors = BTreeMap::new();
    for site in &all_sites {
        let mut views = Vec::new();
        for (i, (input, w)) in inputs.iter().zip(weights).enumerate() {
            let Some((a, b)) = input.sites.get(*site) else {
                continue;
            };
            let (rank, scaling) =
                site_scaling(&input.config, site).map_err(peft(input.dir.join(ADAPTER_CONFIG)))?;
            let f = SiteLora {
                a: &a.1,
                b: &b.1,
                rank,
                d_in: a.0[1],
                d_out: b.0[0],
                scaling,
            };
            views.push((i, *w, f));
        }
        let (d_in, d_out) = (views[0].2.d_in, views[0].2.d_out);
        let (a, b) = merge
            .combine_site(site, &views, inputs.len(), new_rank)
            .map_err(|source| {
                let dir = &inputs[views.last().map_or(0, |v| v.0)].dir;
                IoError::Peft {
                    path: dir.join(ADAPTER_SAFETENSORS),
                    source,
                }
            })?;
        tensors.insert(
            format!("{PREFIX}{site}.lora_A.weight"),
            (vec![new_rank, d_in], a),
        );
        tensors.insert(
            format!("{PREFIX}{site}.lora_B.weight"),
            (vec![d_out, new_rank], b),
        );
    }
    Ok(MergedAdapter {
        config,
        tensors,
        sites: all_sites.into_iter().cloned().collect(),
    })
}

/// Writes a LoRA adapter as PEFT does (`adapter_config.json` + `adapter_model.safetensors`),
/// each file to a temporary name and renamed.
pub fn save_lora_adapter(
    dir: &Path,
    config: &LoraConfig,
    tensors: &BTreeMap<String, F32Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_SAFETENSORS), tensors, metadata)?;
    let mut config = config.clone();
    config.header.inference_mode = true;
    write_atomic(&dir.join(ADAPTER_CONFIG), config.to_json().as_bytes())
}
