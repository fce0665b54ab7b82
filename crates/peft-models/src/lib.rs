//! # peft-models
//!
//! Transformer architectures whose linear layers are [`peft_core::AdaptedLinear`] sites and whose
//! sub-layer outputs are [`peft_core::SublayerAdapters`] sites (where bottleneck adapters sit),
//! with module paths equal to Hugging Face's (`encoder.block.0.layer.0.SelfAttention.q`,
//! `encoder.layer.3.output`), so that PEFT target names and PEFT/AdapterHub checkpoint keys line
//! up without per-model glue.
//!
//! This crate owns the architectures (one file each: [`t5`], [`bert`]) and their
//! [`peft_core::AdapterHost`] walks and [`hf::HfParams`] name tables; generation (greedy, beam)
//! lives apart from them in [`generation`], over any [`generation::Seq2SeqGenerate`] model. It knows no adapter method
//! and reads no file (peft-io does).
#![deny(missing_docs)]

pub mod bert;
mod error;
pub mod generation;
pub mod hf;
pub mod t5;

pub use bert::{BertConfig, BertForSequenceClassification, BertModel};
pub use error::{ModelError, Result};

/// The most layers a config may ask for: far beyond any published model, and small enough that
/// building the (lazy) layer structs cannot exhaust memory.
pub const MAX_LAYERS: usize = 4096;

/// The most parameters a config may describe (2^40, 4 TiB of f32): refused before anything is
/// built.
pub const MAX_PARAMS: u128 = 1 << 40;

/// Refuses a config whose layer counts or estimated parameter count (`params`, computed with
/// `u128` so it cannot overflow) no machine could hold, with the numbers.
/// Parses a `config.json` body, naming the field whose type or value is wrong.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field.is_empty() || field == "." || inner.is_syntax() || inner.is_eof() {
            ModelError::Config(inner.to_string())
        } else {
            ModelError::Config(format!("field `{field}`: {inner}"))
        }
    })
}

pub(crate) fn check_size(layers: &[(&str, usize)], params: u128) -> Result<()> {
    for (name, n) in layers {
        if *n > MAX_LAYERS {
            return Err(ModelError::Config(format!(
                "{name} is {n}, more than the {MAX_LAYERS} layers this crate accepts"
            )));
        }
    }
    if params > MAX_PARAMS {
        return Err(ModelError::Config(format!(
            "the config describes about {params} parameters ({} GiB of f32), more than the {MAX_PARAMS} accepted",
            params * 4 / (1 << 30)
        )));
    }
    Ok(())
}
pub use hf::{HfParamMut, HfParams};
pub use t5::{T5Config, T5ForConditionalGeneration};
