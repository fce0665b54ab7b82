//! PiSSA and OLoRA adapters as plain LoRA adapters of the original base (PEFT's
//! `save_pretrained(path_initial_model_for_weight_conversion=...)`): those inits move part of
//! the base weight into the adapter, so the adapter as trained only holds on the residual base.
//! Saved this way, it applies to the unchanged base model, in PEFT as here.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::methods::lora::init::{plain_lora_config, to_plain_lora};
use peft_core::{AdapterHost, LoraConfig, PeftError, PeftModel};

use crate::adapter::{adapter_state_dict, saved_config};
use crate::error::{IoError, Result};
use crate::tensors::F32Tensor;

/// Writes adapter `name` of `peft`, trained from the PiSSA or OLoRA init whose tensors were
/// `initial` ([`adapter_state_dict`] right after the adapter was added), into `dir` as a plain
/// LoRA of the original base, at twice the rank. Returns its config.
pub fn save_as_plain_lora<B: Backend, M: AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    name: &str,
    initial: &BTreeMap<String, F32Tensor>,
    dir: &Path,
) -> Result<LoraConfig> {
    let err = |source| IoError::Peft {
        path: dir.to_path_buf(),
        source,
    };
    let config = saved_config(peft, name).ok_or_else(|| {
        err(PeftError::AdapterNotFound {
            name: name.to_string(),
            existing: peft.adapter_names().join(", "),
        })
    })?;
    let config = plain_lora_config(&config).map_err(err)?;
    let trained = adapter_state_dict(peft, name);
    let mut out = BTreeMap::new();
    for (key, t) in &trained {
        if key.ends_with(".lora_B.weight") {
            continue;
        }
        let Some(site) = key.strip_suffix(".lora_A.weight") else {
            out.insert(key.clone(), t.clone());
            continue;
        };
        let b_key = format!("{site}.lora_B.weight");
        let (Some(b), Some(a0), Some(b0)) =
            (trained.get(&b_key), initial.get(key), initial.get(&b_key))
        else {
            return Err(IoError::MissingKeys {
                path: dir.to_path_buf(),
                keys: vec![b_key],
            });
        };
        let (r, d_in, d_out) = (t.0[0], t.0[1], b.0[0]);
        if a0.0 != t.0 || b0.0 != b.0 {
            return Err(IoError::ShapeMismatch {
                path: dir.to_path_buf(),
                key: key.clone(),
                expected: t.0.clone(),
                found: a0.0.clone(),
            });
        }
        let (a2, b2) = to_plain_lora(&t.1, &b.1, &a0.1, &b0.1, r, d_in, d_out);
        out.insert(key.clone(), (vec![2 * r, d_in], a2));
        out.insert(b_key, (vec![d_out, 2 * r], b2));
    }
    crate::weighted::save_lora_adapter(dir, &config, &out)?;
    Ok(config)
}
