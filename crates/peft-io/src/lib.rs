//! # peft-io
//!
//! Every file format of peft-rs lives here and only here: PEFT adapter directories
//! (`adapter_config.json`, `adapter_model.safetensors`, legacy `adapter_model.bin`) and
//! Hugging Face model directories (`config.json`, `model.safetensors`, `pytorch_model.bin`,
//! `tokenizer.json`). Tracked in the peft-io issue; `peft-core` and `peft-models` never touch
//! files.
#![deny(missing_docs)]
