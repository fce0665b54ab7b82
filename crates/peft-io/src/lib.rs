//! # peft-io
//!
//! Every file format of peft lives here and only here:
//! - PEFT adapter directories ([`adapter`]): `adapter_config.json` with
//!   `adapter_model.safetensors` (or the legacy `adapter_model.bin`), keys and shapes exactly as
//!   PEFT writes them, in both directions (LoRA and IA3);
//! - AdapterHub bottleneck adapter directories ([`adapterhub`]): `adapter_config.json` with
//!   `adapter.safetensors` (or `pytorch_adapter.bin`), keys as the `adapters` library writes them;
//! - Hugging Face model directories ([`hf_model`]): `config.json` with `model.safetensors`,
//!   sharded `model.safetensors.index.json`, or `pytorch_model.bin`;
//! - `tokenizer.json` ([`tokenizer`]) through the `tokenizers` crate;
//! - the tensor readers under both ([`tensors`]): safetensors memory-mapped with its header
//!   validated, PyTorch checkpoints parsed without executing pickle code, behind a gate that
//!   simulates each pickle (a global allowlist, with names resolved through the memo; budgets
//!   on elements, nesting depth and memo size; every tensor checked against its storage's
//!   bytes) before anything parses it ([`pickle`]).
//!
//! Every file is opened through [`files`]: regular files only (a directory, FIFO or device is
//! refused by name, never read), with size limits on what is read whole into memory.
//!
//! `peft-core` and `peft-models` never touch files. Every error names the file (and the key,
//! and expected vs found shapes where it applies).
#![deny(missing_docs)]

pub mod adapter;
pub mod adapterhub;
pub mod auto;
pub mod checkpoint;
mod error;
pub mod files;
pub mod hf_model;
pub mod lora_init;
pub mod pickle;
pub mod prompt;
pub mod tensors;
pub mod tokenizer;
pub mod weighted;

pub use adapter::{from_pretrained, load_adapter, read_adapter_config, save_pretrained};
pub use auto::{AutoModel, FromPretrained, load_pretrained};
pub use error::{IoError, Result};
pub use hf_model::{
    LoadReport, load_bert, load_bert_classifier, load_hf_weights, load_t5, open_weights,
    save_hf_model,
};
pub use tensors::{SafetensorsFile, TensorSource};
pub use tokenizer::{Batch, TextTokenizer};
