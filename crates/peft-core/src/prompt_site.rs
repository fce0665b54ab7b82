//! The prompt site: where a model takes virtual tokens. A model that supports prompt learning
//! owns one [`PromptSite`] and asks it, on every forward pass, for the rows to prepend to its
//! input embeddings ([`PromptSite::input_prefix`]) and for the keys and values to prepend in
//! each self-attention layer ([`PromptSite::key_value_prefix`]). Both are `None` when no prompt
//! adapter is active, so the model computes exactly what it computes without adapters.
//!
//! The methods (prompt tuning, P-tuning, prefix tuning; `methods/prompt`) only fill the site:
//! the next method of this kind is a change in peft-core alone.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{PeftError, Result};
use crate::methods::prompt::layer::{PromptAdapter, PromptKind};

/// What the prompt methods need to know of a model (PEFT's `_prepare_prompt_learning_config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptGeometry {
    /// Hidden size (`token_dim`).
    pub token_dim: usize,
    /// `num_layers` as PEFT reads it (T5: the encoder's depth).
    pub num_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// An encoder-decoder model (PEFT's `num_transformer_submodules = 2`).
    pub encoder_decoder: bool,
    /// Why this model takes no key/value prefix, if it does not.
    pub key_value_refusal: Option<&'static str>,
}

/// The prompt site of a model: its prompt adapters, the active one, and whether adapters are
/// disabled.
#[derive(Module, Debug)]
pub struct PromptSite<B: Backend> {
    /// The prompt adapters, by name.
    pub adapters: Vec<PromptAdapter<B>>,
    /// The active adapters (the first prompt adapter among them runs; PEFT runs one).
    pub active: Vec<String>,
    /// When true, no virtual tokens.
    pub disabled: bool,
    /// The model's shape as the methods see it.
    #[module(skip)]
    pub geometry: PromptGeometry,
}

impl<B: Backend> PromptSite<B> {
    /// An empty site for a model of `geometry`.
    pub fn new(geometry: PromptGeometry) -> Self {
        PromptSite {
            adapters: Vec::new(),
            active: Vec::new(),
            disabled: false,
            geometry,
        }
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&PromptAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, mutably.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut PromptAdapter<B>> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    /// Adds an adapter.
    pub fn add(&mut self, adapter: PromptAdapter<B>) -> Result<()> {
        if self.adapter(&adapter.name).is_some() {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        if adapter.spec.kind == PromptKind::KeyValue
            && let Some(why) = self.geometry.key_value_refusal
        {
            return Err(PeftError::Unsupported(format!("prefix tuning here: {why}")));
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Removes adapter `name`.
    pub fn delete(&mut self, name: &str) {
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
    }

    /// The adapter that runs: the first active one, unless adapters are disabled.
    pub fn current(&self) -> Option<&PromptAdapter<B>> {
        if self.disabled {
            return None;
        }
        self.active.iter().find_map(|n| self.adapter(n))
    }

    /// The rows to prepend to the input embeddings, `[batch, num_virtual_tokens, token_dim]`
    /// (the first `num_virtual_tokens` rows of the adapter's output, as PEFT takes them).
    pub fn input_prefix(&self, batch: usize) -> Option<Tensor<B, 3>> {
        let a = self
            .current()
            .filter(|a| a.spec.kind == PromptKind::Input)?;
        let out = a.output().narrow(0, 0, a.spec.num_virtual_tokens);
        let [n, d] = out.dims();
        Some(out.reshape([1, n, d]).expand([batch, n, d]))
    }

    /// The keys and values to prepend in self-attention layer `i`, each
    /// `[batch, heads, num_virtual_tokens, head_dim]`, for every layer (PEFT's
    /// `past_key_values`: the row of each virtual token viewed as `[2 x layers, heads,
    /// head_dim]`, layer `i` taking channels `2i` and `2i + 1`).
    pub fn key_value_prefix(&self, batch: usize) -> Option<Vec<(Tensor<B, 4>, Tensor<B, 4>)>> {
        let a = self
            .current()
            .filter(|a| a.spec.kind == PromptKind::KeyValue)?;
        let s = &a.spec;
        let (n, l, h) = (s.num_virtual_tokens, s.num_layers, s.num_heads);
        let dh = s.token_dim / h;
        // [n, 2L, H, dh] -> [2L, H, n, dh]
        let kv = a.output().reshape([n, 2 * l, h, dh]).permute([1, 2, 0, 3]);
        let channel = |c: usize| kv.clone().narrow(0, c, 1).expand([batch, h, n, dh]);
        Some(
            (0..l)
                .map(|i| (channel(2 * i), channel(2 * i + 1)))
                .collect(),
        )
    }

    /// Virtual tokens before the real ones in the key/value sequence (what position ids start
    /// at under prefix tuning).
    pub fn key_value_len(&self) -> usize {
        self.current()
            .filter(|a| a.spec.kind == PromptKind::KeyValue)
            .map_or(0, |a| a.spec.num_virtual_tokens)
    }
}
