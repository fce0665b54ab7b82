//! T5, T5 v1.1, mT5, mt0 and T0 (`T5ForConditionalGeneration` / `MT5ForConditionalGeneration`)
//! in one implementation driven by `config.json`, numerically equal to transformers'.
//!
//! - T5 v1.0: ReLU feed-forward, embeddings tied to the LM head with the `d_model**-0.5` rescale
//!   of the decoder output; T5 v1.1 / mT5 / mt0 / T0: gated-GELU (tanh approximation,
//!   `gelu_new`), untied `lm_head`.
//! - RMS layer norm (no mean, no bias), no attention scaling, relative position buckets
//!   (bidirectional in the encoder, causal in the decoder) computed in block 0 of each stack and
//!   shared by all blocks.
//! - Module paths are Hugging Face's: `encoder.block.0.layer.0.SelfAttention.q`,
//!   `decoder.block.1.layer.1.EncDecAttention.v`, `decoder.block.0.layer.2.DenseReluDense.wo`,
//!   `lm_head`.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use peft_core::Dropout;
use peft_core::ops;
use peft_core::{
    AdaptedLinear, AdapterHost, SublayerAdapters, SublayerKind, SublayerSite, TaskType,
};
use peft_core::{PromptGeometry, PromptSite};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::hf::{HfParamMut, HfParams};

fn default_vocab() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_layers() -> usize {
    6
}
fn default_heads() -> usize {
    8
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> Option<usize> {
    Some(1)
}
fn default_pad() -> Option<usize> {
    Some(0)
}
fn default_model_type() -> String {
    "t5".into()
}

/// The fields of a T5/mT5 `config.json` this implementation uses (others are ignored), with
/// transformers' defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    /// `t5` or `mt5`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Hidden size.
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// Size of each attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    /// Feed-forward inner size.
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    /// Encoder blocks.
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    /// Decoder blocks (default: `num_layers`).
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_heads: usize,
    /// Relative position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Largest distance told apart by the buckets.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Dropout rate (training only).
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu`, `gated-silu`, ...
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    /// Whether `lm_head` is the shared embedding (T5 v1.0) with the output rescale.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Padding token (also the decoder start token by default).
    #[serde(default = "default_pad")]
    pub pad_token_id: Option<usize>,
    /// End-of-sequence token.
    #[serde(default = "default_eos")]
    pub eos_token_id: Option<usize>,
    /// First decoder token.
    #[serde(default)]
    pub decoder_start_token_id: Option<usize>,
}

/// The feed-forward activation, as transformers derives it from `feed_forward_proj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum T5Act {
    /// `relu`.
    Relu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `gelu_new` (tanh approximation; what `gated-gelu` means).
    GeluNew,
    /// `silu` / `swish`.
    Silu,
}

impl T5Act {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            T5Act::Relu => relu(x),
            T5Act::Gelu => gelu(x),
            T5Act::GeluNew => peft_core::nn::gelu_tanh(x),
            T5Act::Silu => silu(x),
        }
    }
}

impl T5Config {
    /// Parses `config.json`, refusing model types other than `t5` / `mt5`.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: T5Config = crate::parse_config(text)?;
        if c.model_type != "t5" && c.model_type != "mt5" {
            return Err(ModelError::WrongModelType {
                expected: "t5 or mt5",
                found: c.model_type,
            });
        }
        c.activation()?;
        c.check_size()?;
        Ok(c)
    }

    /// Refuses layer counts and sizes no machine could hold (see [`crate::MAX_PARAMS`]).
    pub fn check_size(&self) -> Result<()> {
        let (v, d, kv, ff, h) = (
            self.vocab_size as u128,
            self.d_model as u128,
            self.d_kv as u128,
            self.d_ff as u128,
            self.num_heads as u128,
        );
        let attn = 4 * d * h * kv;
        let ffn = 3 * d * ff;
        let layers = self.num_layers as u128 + self.decoder_layers() as u128;
        let params = 2 * v * d + layers * (2 * attn + ffn);
        crate::check_size(
            &[
                ("num_layers", self.num_layers),
                ("num_decoder_layers", self.decoder_layers()),
            ],
            params,
        )
    }

    /// An estimate of the bytes of activations a forward pass over `batch` rows of
    /// `source_len` encoder and `target_len` decoder tokens holds at its peak (f32): attention
    /// scores with their bias, mask and softmax copies, hidden states, the feed-forward and the
    /// logits. With `training`, every layer's activations are kept for the backward pass.
    /// Nothing is allocated; compare it with the memory available before running.
    ///
    /// ```
    /// let c = peft_models::T5Config::preset_by_name("mt0-small").unwrap();
    /// let short = c.activation_bytes(1, 128, 8, false);
    /// assert!(c.activation_bytes(1, 20_000, 8, false) > 1000 * short);
    /// ```
    pub fn activation_bytes(
        &self,
        batch: usize,
        source_len: usize,
        target_len: usize,
        training: bool,
    ) -> u128 {
        let (b, l, t) = (batch as u128, source_len as u128, target_len as u128);
        let (h, d, ff, v) = (
            self.num_heads as u128,
            self.d_model as u128,
            self.d_ff as u128,
            self.vocab_size as u128,
        );
        let inner = (self.num_heads * self.d_kv) as u128;
        // Scores with bias and mask, then softmax (the backward keeps both); hidden states,
        // q/k/v/o and the feed-forward's activations.
        let enc_layer = 3 * b * h * l * l + b * l * (6 * d + 4 * inner + 2 * ff);
        let dec_layer =
            3 * b * h * t * (t + l) + b * t * (8 * d + 6 * inner + 2 * ff) + 2 * b * l * inner;
        let layers = if training {
            self.num_layers as u128 * enc_layer + self.decoder_layers() as u128 * dec_layer
        } else {
            enc_layer.max(dec_layer) + b * l * d
        };
        4 * (layers + 3 * b * t * v)
    }

    /// Decoder depth.
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Whether the feed-forward is gated (`wi_0`, `wi_1`).
    pub fn is_gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Result<T5Act> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let bad = || {
            ModelError::Config(format!(
                "unsupported feed_forward_proj {:?}",
                self.feed_forward_proj
            ))
        };
        if parts.len() > 2 || (parts.len() == 2 && parts[0] != "gated") {
            return Err(bad());
        }
        if self.feed_forward_proj == "gated-gelu" {
            return Ok(T5Act::GeluNew);
        }
        match *parts.last().unwrap() {
            "relu" => Ok(T5Act::Relu),
            "gelu" => Ok(T5Act::Gelu),
            "gelu_new" => Ok(T5Act::GeluNew),
            "silu" | "swish" => Ok(T5Act::Silu),
            _ => Err(bad()),
        }
    }

    /// The first decoder token (`decoder_start_token_id`, else `pad_token_id`, else 0).
    pub fn decoder_start(&self) -> usize {
        self.decoder_start_token_id
            .or(self.pad_token_id)
            .unwrap_or(0)
    }

    fn preset(
        model_type: &str,
        vocab: usize,
        d_model: usize,
        d_ff: usize,
        layers: usize,
        heads: usize,
        v11: bool,
    ) -> Self {
        T5Config {
            model_type: model_type.into(),
            vocab_size: vocab,
            d_model,
            d_kv: 64,
            d_ff,
            num_layers: layers,
            num_decoder_layers: None,
            num_heads: heads,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            dropout_rate: 0.1,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: if v11 { "gated-gelu" } else { "relu" }.into(),
            tie_word_embeddings: !v11,
            pad_token_id: Some(0),
            eos_token_id: Some(1),
            decoder_start_token_id: Some(0),
        }
    }

    /// The configs of well-known checkpoints, so that counts and dry runs need no download:
    /// `t5-small`, `t5-base`, `t5-large`, `mt0-small`, `mt0-base`, `mt0-large`, `mt0-xl`
    /// (also as `mt5-*`), `t0-3b`, and `mt0-tiny` (a small mT5-architecture model for CPU demos).
    pub fn preset_by_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let name = name.rsplit('/').next().unwrap_or(&name).replace('_', "-");
        let mt = |d, ff, l, h| Self::preset("mt5", 250112, d, ff, l, h, true);
        Some(match name.as_str() {
            "t5-small" => Self::preset("t5", 32128, 512, 2048, 6, 8, false),
            "t5-base" => Self::preset("t5", 32128, 768, 3072, 12, 12, false),
            "t5-large" => Self::preset("t5", 32128, 1024, 4096, 24, 16, false),
            "mt0-small" | "mt5-small" => mt(512, 1024, 8, 6),
            "mt0-base" | "mt5-base" => mt(768, 2048, 12, 12),
            "mt0-large" | "mt5-large" => mt(1024, 2816, 24, 16),
            "mt0-xl" | "mt5-xl" => mt(2048, 5120, 24, 32),
            "t0-3b" => Self::preset("t5", 32128, 2048, 5120, 24, 32, true),
            // A small mT5-architecture model for CPU demos and tests (set `vocab_size` to the
            // tokenizer's).
            "mt0-tiny" => T5Config {
                d_kv: 32,
                ..Self::preset("mt5", 512, 128, 256, 2, 4, true)
            },
            _ => return None,
        })
    }

    /// Names accepted by [`preset_by_name`](Self::preset_by_name).
    pub const PRESETS: &'static [&'static str] = &[
        "t5-small",
        "t5-base",
        "t5-large",
        "mt0-tiny",
        "mt0-small",
        "mt0-base",
        "mt0-large",
        "mt0-xl",
        "t0-3b",
    ];

    /// The config as transformers writes `config.json` (with `architectures`), so that a model
    /// saved from a preset loads in transformers.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let arch = if self.model_type == "mt5" {
            "MT5ForConditionalGeneration"
        } else {
            "T5ForConditionalGeneration"
        };
        v["architectures"] = serde_json::json!([arch]);
        v["is_encoder_decoder"] = serde_json::json!(true);
        v["num_decoder_layers"] = serde_json::json!(self.decoder_layers());
        v["decoder_start_token_id"] = serde_json::json!(self.decoder_start());
        v
    }
}

/// T5's RMS norm: `x / sqrt(mean(x^2) + eps) * weight`, no mean subtraction, no bias.
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    /// Scale, `[d_model]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        T5LayerNorm {
            weight: Initializer::Ones.init([d], device),
            eps,
        }
    }

    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// T5's bucketing of relative positions (`memory - query`), exactly as transformers computes it
/// (float32 logarithm, truncation toward zero).
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let mut rp = relative_position;
    if bidirectional {
        num_buckets /= 2;
        if rp > 0 {
            bucket += num_buckets;
        }
        rp = rp.abs();
    } else {
        rp = -rp.min(0);
    }
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let ratio = (rp as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// Cached keys and values of one attention layer: `len` positions of buffers
/// `[batch, heads, capacity, d_kv]` with room for more.
///
/// A decoding step appends in place ([`KvCache::append`]): the new position is written into the
/// buffers, which grow by doubling when full, so a generation of `n` tokens copies the cache
/// `O(log n)` times instead of once per token. The keys' buffer is laid out transposed in
/// memory (`[batch, heads, d_kv, capacity]`), so that the attention scores `q kᵀ` read it
/// with no copy (on burn-ndarray; other backends keep their own layouts).
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache holding exactly `k` and `v` (`[batch, heads, len, d_kv]`, the same shape).
    pub fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        KvCache {
            k: ops::contiguous(k.swap_dims(2, 3)).swap_dims(2, 3),
            v,
            len,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers have room for before they grow.
    pub fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The keys, `[batch, heads, len, d_kv]` (a view of the buffer on burn-ndarray).
    pub fn keys(&self) -> Tensor<B, 4> {
        ops::narrow(self.k.clone(), 2, 0, self.len)
    }

    /// The values, `[batch, heads, len, d_kv]` (a view of the buffer on burn-ndarray).
    pub fn values(&self) -> Tensor<B, 4> {
        ops::narrow(self.v.clone(), 2, 0, self.len)
    }

    /// Appends the positions of `k` and `v` (`[batch, heads, new, d_kv]`), in place when the
    /// buffers have room and are not shared, into buffers of twice the capacity otherwise.
    ///
    /// # Panics
    /// When batch, heads or head size differ from the cache's.
    pub fn append(mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let [b, h, new, d] = k.dims();
        let [cb, ch, cap, cd] = self.k.dims();
        assert_eq!(
            [b, h, d],
            [cb, ch, cd],
            "KV cache append: batch, heads, head size"
        );
        let end = self.len + new;
        if end > cap {
            let grown = end.max(2 * cap).max(16);
            let device = k.device();
            let (kept_k, kept_v) = (self.keys(), self.values());
            let keys = Tensor::<B, 4>::zeros([b, h, d, grown], &device).swap_dims(2, 3);
            let values = Tensor::<B, 4>::zeros([b, h, grown, d], &device);
            self.k = ops::assign_at(keys, 2, 0, kept_k);
            self.v = ops::assign_at(values, 2, 0, kept_v);
        }
        self.k = ops::assign_at(self.k, 2, self.len, k);
        self.v = ops::assign_at(self.v, 2, self.len, v);
        self.len = end;
        self
    }

    /// Keeps the rows `rows` of the batch, in that order (the keys' buffer keeps its
    /// transposed layout).
    pub fn select_rows(&mut self, rows: Tensor<B, 1, Int>) {
        let keys = self.k.clone().select(0, rows.clone()).swap_dims(2, 3);
        self.k = ops::contiguous(keys).swap_dims(2, 3);
        self.v = self.v.clone().select(0, rows);
    }
}

/// Multi-head attention without score scaling; `q`, `k`, `v`, `o` are adapter sites.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    /// Query projection.
    pub q: AdaptedLinear<B>,
    /// Key projection.
    pub k: AdaptedLinear<B>,
    /// Value projection.
    pub v: AdaptedLinear<B>,
    /// Output projection.
    pub o: AdaptedLinear<B>,
    /// Relative position bias (block 0 only), `[buckets, heads]`.
    pub relative_attention_bias: Option<Embedding<B>>,
    /// Attention-probability dropout.
    pub dropout: Dropout,
    /// Heads.
    pub n_heads: usize,
    /// Head size.
    pub d_kv: usize,
    /// Buckets.
    pub num_buckets: usize,
    /// Max distance.
    pub max_distance: usize,
}

impl<B: Backend> T5Attention<B> {
    fn new(c: &T5Config, has_bias: bool, device: &B::Device) -> Self {
        let inner = c.num_heads * c.d_kv;
        T5Attention {
            q: AdaptedLinear::new(c.d_model, inner, false, device),
            k: AdaptedLinear::new(c.d_model, inner, false, device),
            v: AdaptedLinear::new(c.d_model, inner, false, device),
            o: AdaptedLinear::new(inner, c.d_model, false, device),
            relative_attention_bias: has_bias.then(|| {
                EmbeddingConfig::new(c.relative_attention_num_buckets, c.num_heads).init(device)
            }),
            dropout: Dropout::new(c.dropout_rate),
            n_heads: c.num_heads,
            d_kv: c.d_kv,
            num_buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
        }
    }

    /// The position bias `[1, heads, q_len, k_len]` for queries at `q_offset..q_offset+q_len`.
    pub fn compute_bias(
        &self,
        q_offset: usize,
        q_len: usize,
        k_len: usize,
        bidirectional: bool,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let emb = self
            .relative_attention_bias
            .as_ref()
            .expect("position bias is computed by the block that has it");
        let mut buckets = Vec::with_capacity(q_len * k_len);
        for i in 0..q_len {
            for j in 0..k_len {
                let rel = j as i64 - (i + q_offset) as i64;
                buckets.push(relative_position_bucket(
                    rel,
                    bidirectional,
                    self.num_buckets,
                    self.max_distance,
                ) as i64);
            }
        }
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [q_len, k_len]), device);
        // [q, k, heads] -> [1, heads, q, k]
        emb.forward(idx).permute([2, 0, 1]).unsqueeze()
    }

    fn heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, l, _] = x.dims();
        ops::reshape(x, [b, l, self.n_heads, self.d_kv]).swap_dims(1, 2)
    }

    /// Attention of `x` over `kv_input` (itself for self-attention), with an additive bias
    /// (position bias plus mask). With `cache`, incremental decoding: cross-attention
    /// (`static_kv`) computes its keys and values once and reuses them, self-attention appends
    /// this step's to the cache; without, nothing is kept.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        kv_input: Option<Tensor<B, 3>>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<KvCache<B>>>,
        static_kv: bool,
    ) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let q = self.heads(self.q.forward(x.clone()));
        let project = |x: Tensor<B, 3>| {
            let src = kv_input.clone().unwrap_or(x);
            (
                self.heads(self.k.forward(src.clone())),
                self.heads(self.v.forward(src)),
            )
        };
        let (k, v) = match cache {
            None => project(x),
            Some(slot) => {
                let kv = match slot.take() {
                    Some(c) if static_kv => c,
                    Some(c) => {
                        let (k, v) = project(x);
                        c.append(k, v)
                    }
                    None => {
                        let (k, v) = project(x);
                        KvCache::new(k, v)
                    }
                };
                let kv = slot.insert(kv);
                (kv.keys(), kv.values())
            }
        };
        let scores = ops::matmul(q, k.swap_dims(2, 3));
        let weights = self.dropout.forward(ops::softmax_biased(scores, bias));
        let out = ops::reshape(
            ops::matmul(weights, v).swap_dims(1, 2),
            [b, l, self.n_heads * self.d_kv],
        );
        self.o.forward(out)
    }
}

/// `layer.N.SelfAttention` / `layer.1.EncDecAttention` with its pre-norm and residual.
#[derive(Module, Debug)]
pub struct T5AttentionLayer<B: Backend> {
    /// The attention.
    pub attention: T5Attention<B>,
    /// Pre-norm.
    pub layer_norm: T5LayerNorm<B>,
    /// Residual dropout.
    pub dropout: Dropout,
    /// Bottleneck adapters where the residual is added (AdapterHub's `mh_adapter` or
    /// `cross_adapter`).
    pub adapters: SublayerAdapters<B>,
}

/// `layer.N.DenseReluDense` with its pre-norm and residual.
#[derive(Module, Debug)]
pub struct T5FeedForward<B: Backend> {
    /// Input projection (non-gated).
    pub wi: Option<AdaptedLinear<B>>,
    /// Gate projection (gated).
    pub wi_0: Option<AdaptedLinear<B>>,
    /// Linear projection (gated).
    pub wi_1: Option<AdaptedLinear<B>>,
    /// Output projection.
    pub wo: AdaptedLinear<B>,
    /// Pre-norm.
    pub layer_norm: T5LayerNorm<B>,
    /// Inner dropout.
    pub inner_dropout: Dropout,
    /// Residual dropout.
    pub dropout: Dropout,
    /// Bottleneck adapters where the residual is added (AdapterHub's `output_adapter`).
    pub adapters: SublayerAdapters<B>,
    /// Activation.
    #[module(skip)]
    pub act: T5Act,
}

impl<B: Backend> T5FeedForward<B> {
    fn new(c: &T5Config, device: &B::Device) -> Result<Self> {
        let gated = c.is_gated();
        let lin = |i, o| AdaptedLinear::new(i, o, false, device);
        Ok(T5FeedForward {
            wi: (!gated).then(|| lin(c.d_model, c.d_ff)),
            wi_0: gated.then(|| lin(c.d_model, c.d_ff)),
            wi_1: gated.then(|| lin(c.d_model, c.d_ff)),
            wo: lin(c.d_ff, c.d_model),
            layer_norm: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
            inner_dropout: Dropout::new(c.dropout_rate),
            dropout: Dropout::new(c.dropout_rate),
            adapters: SublayerAdapters::new(),
            act: c.activation()?,
        })
    }

    fn forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.layer_norm.forward(h.clone());
        let inner = match (&self.wi, &self.wi_0, &self.wi_1) {
            (Some(wi), _, _) => self.act.apply(wi.forward(x)),
            (None, Some(w0), Some(w1)) => {
                let (gate, linear) = (w0.forward(x.clone()), w1.forward(x));
                match self.act {
                    // One pass instead of two (the same values).
                    T5Act::GeluNew => peft_core::ops::gelu_tanh_mul(gate, linear),
                    act => peft_core::ops::mul(act.apply(gate), linear),
                }
            }
            _ => unreachable!("constructed with wi or wi_0 and wi_1"),
        };
        // AdapterHub: `bottleneck_layer_forward(dropout(out), residual_input=h, layer_norm=None)`.
        let out = self
            .dropout
            .forward(self.wo.forward(self.inner_dropout.forward(inner)));
        self.adapters.forward(out, h, None)
    }
}

impl<B: Backend> T5AttentionLayer<B> {
    fn new(c: &T5Config, has_bias: bool, device: &B::Device) -> Self {
        T5AttentionLayer {
            attention: T5Attention::new(c, has_bias, device),
            layer_norm: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
            dropout: Dropout::new(c.dropout_rate),
            adapters: SublayerAdapters::new(),
        }
    }

    fn forward(
        &self,
        h: Tensor<B, 3>,
        kv_input: Option<Tensor<B, 3>>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<KvCache<B>>>,
        static_kv: bool,
    ) -> Tensor<B, 3> {
        let x = self.layer_norm.forward(h.clone());
        let out = self.attention.forward(x, kv_input, bias, cache, static_kv);
        self.adapters.forward(self.dropout.forward(out), h, None)
    }
}

/// One block: self-attention, cross-attention (decoder), feed-forward.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// `layer.0.SelfAttention`.
    pub self_attention: T5AttentionLayer<B>,
    /// `layer.1.EncDecAttention` (decoder only).
    pub cross_attention: Option<T5AttentionLayer<B>>,
    /// `layer.1` (encoder) or `layer.2` (decoder) `DenseReluDense`.
    pub ff: T5FeedForward<B>,
}

/// Per-layer decoder caches for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct DecoderCache<B: Backend> {
    /// Self-attention keys/values per block.
    pub self_kv: Vec<KvCache<B>>,
    /// Cross-attention keys/values per block (computed once from the encoder output).
    pub cross_kv: Vec<KvCache<B>>,
    /// Tokens decoded so far.
    pub len: usize,
}

impl<B: Backend> DecoderCache<B> {
    /// Keeps the rows `rows` (in that order) of every self- and cross-attention cache.
    pub fn select_rows(&mut self, rows: Tensor<B, 1, Int>) {
        for kv in self.self_kv.iter_mut().chain(self.cross_kv.iter_mut()) {
            kv.select_rows(rows.clone());
        }
    }

    /// Appends the rows of `other`, a cache of no more steps than this one and possibly of
    /// another source length: its self-attention keys and values are left-padded with zeros to
    /// this cache's length (mask those slots in the decoder mask), and the cross-attention ones
    /// of both are padded at the end to the longer source (mask them in the encoder mask).
    pub fn append_rows(&mut self, other: DecoderCache<B>) {
        if self.self_kv.is_empty() {
            *self = other;
            return;
        }
        let pad = |t: Tensor<B, 4>, len: usize, front: bool| {
            let [b, h, l, d] = t.dims();
            if l >= len {
                return t;
            }
            let z = Tensor::zeros([b, h, len - l, d], &t.device());
            Tensor::cat(if front { vec![z, t] } else { vec![t, z] }, 2)
        };
        for (a, b) in self.self_kv.iter_mut().zip(other.self_kv) {
            let len = a.len();
            *a = KvCache::new(
                Tensor::cat(vec![a.keys(), pad(b.keys(), len, true)], 0),
                Tensor::cat(vec![a.values(), pad(b.values(), len, true)], 0),
            );
        }
        for (a, b) in self.cross_kv.iter_mut().zip(other.cross_kv) {
            let len = a.len().max(b.len());
            *a = KvCache::new(
                Tensor::cat(
                    vec![pad(a.keys(), len, false), pad(b.keys(), len, false)],
                    0,
                ),
                Tensor::cat(
                    vec![pad(a.values(), len, false), pad(b.values(), len, false)],
                    0,
                ),
            );
        }
    }
}

/// The encoder output the decoder attends to, with its attention mask.
pub type EncoderMemory<B> = (Tensor<B, 3>, Option<Tensor<B, 2, Int>>);

/// An encoder or decoder stack.
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// Blocks.
    pub block: Vec<T5Block<B>>,
    /// `final_layer_norm`.
    pub final_layer_norm: T5LayerNorm<B>,
    /// Embedding dropout.
    pub dropout: Dropout,
    /// Decoder (causal, cross-attention) or encoder.
    pub is_decoder: bool,
}

fn neg_mask<B: Backend>(allowed: Tensor<B, 4, Bool>, shape: [usize; 4]) -> Tensor<B, 4> {
    let device = allowed.device();
    Tensor::<B, 4>::zeros(shape, &device).mask_fill(allowed.bool_not(), f32::MIN)
}

impl<B: Backend> T5Stack<B> {
    fn new(c: &T5Config, is_decoder: bool, device: &B::Device) -> Result<Self> {
        let n = if is_decoder {
            c.decoder_layers()
        } else {
            c.num_layers
        };
        let mut block = Vec::with_capacity(n);
        for i in 0..n {
            block.push(T5Block {
                self_attention: T5AttentionLayer::new(c, i == 0, device),
                cross_attention: is_decoder.then(|| T5AttentionLayer::new(c, false, device)),
                ff: T5FeedForward::new(c, device)?,
            });
        }
        Ok(T5Stack {
            block,
            final_layer_norm: T5LayerNorm::new(c.d_model, c.layer_norm_epsilon, device),
            dropout: Dropout::new(c.dropout_rate),
            is_decoder,
        })
    }

    /// Runs the stack on embedded inputs. `mask` is `[batch, len]` (1 = attend) for the inputs;
    /// the decoder also takes the encoder output and its mask, and a cache for incremental
    /// decoding.
    pub fn forward(
        &self,
        embeds: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Int>>,
        encoder: Option<EncoderMemory<B>>,
        mut cache: Option<&mut DecoderCache<B>>,
    ) -> Tensor<B, 3> {
        let device = embeds.device();
        let [b, l, _] = embeds.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let k_len = past + l;
        let heads = self.block[0].self_attention.attention.n_heads;
        let mut bias = self.block[0].self_attention.attention.compute_bias(
            past,
            l,
            k_len,
            !self.is_decoder,
            &device,
        );
        // Which keys each query may see: padding mask and, in the decoder, causality.
        let mut allowed: Option<Tensor<B, 4, Bool>> = None;
        if let Some(m) = &mask {
            let m = m
                .clone()
                .equal_elem(1)
                .reshape([b, 1, 1, k_len])
                .expand([b, 1, l, k_len]);
            allowed = Some(m);
        }
        if self.is_decoder {
            let mut tri = Vec::with_capacity(l * k_len);
            for i in 0..l {
                for j in 0..k_len {
                    tri.push(j <= i + past);
                }
            }
            let causal = Tensor::<B, 2, Bool>::from_data(TensorData::new(tri, [l, k_len]), &device)
                .reshape([1, 1, l, k_len])
                .expand([b, 1, l, k_len]);
            allowed = Some(match allowed {
                Some(a) => a.bool_and(causal),
                None => causal,
            });
        }
        if let Some(a) = allowed {
            bias = bias.expand([b, heads, l, k_len]) + neg_mask(a, [b, 1, l, k_len]);
        }
        let cross_bias = encoder.as_ref().map(|(enc, enc_mask)| {
            let e_len = enc.dims()[1];
            let zero = Tensor::<B, 4>::zeros([b, heads, l, e_len], &device);
            match enc_mask {
                Some(m) => {
                    let allowed = m
                        .clone()
                        .equal_elem(1)
                        .reshape([b, 1, 1, e_len])
                        .expand([b, 1, l, e_len]);
                    zero + neg_mask(allowed, [b, 1, l, e_len])
                }
                None => zero,
            }
        });

        let mut h = self.dropout.forward(embeds);
        // The caches of this step, one slot per block, taken out of `cache` so that the
        // self-attention buffers are appended to in place (not shared), and put back after.
        let slots = |kv: &mut Vec<KvCache<B>>| {
            let mut slots: Vec<Option<KvCache<B>>> =
                std::mem::take(kv).into_iter().map(Some).collect();
            slots.resize(self.block.len(), None);
            slots
        };
        let (mut self_slots, mut cross_slots) = match cache.as_mut() {
            Some(c) => (slots(&mut c.self_kv), slots(&mut c.cross_kv)),
            None => (Vec::new(), Vec::new()),
        };
        for (i, blk) in self.block.iter().enumerate() {
            h = blk
                .self_attention
                .forward(h, None, bias.clone(), self_slots.get_mut(i), false);
            if let (Some(cross), Some((enc, _)), Some(cb)) =
                (&blk.cross_attention, &encoder, &cross_bias)
            {
                h = cross.forward(
                    h,
                    Some(enc.clone()),
                    cb.clone(),
                    cross_slots.get_mut(i),
                    true,
                );
            }
            h = blk.ff.forward(h);
        }
        if let Some(c) = cache.as_mut() {
            c.self_kv = self_slots.into_iter().flatten().collect();
            c.cross_kv = cross_slots.into_iter().flatten().collect();
            c.len += l;
        }
        self.dropout.forward(self.final_layer_norm.forward(h))
    }
}

/// `mask` `[batch, len]` with ones prepended up to `to` columns (the virtual tokens of a prompt
/// are always attended to, as PEFT's `cat(ones, attention_mask)`).
fn extend_mask<B: Backend>(mask: Tensor<B, 2, Int>, to: usize) -> Tensor<B, 2, Int> {
    let [b, l] = mask.dims();
    if l >= to {
        return mask;
    }
    let ones = Tensor::<B, 2, Int>::ones([b, to - l], &mask.device());
    Tensor::cat(vec![ones, mask], 1)
}

/// `T5ForConditionalGeneration` / `MT5ForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct T5ForConditionalGeneration<B: Backend> {
    /// `shared`: token embeddings of both stacks (and the LM head when tied).
    pub shared: Embedding<B>,
    /// `encoder`.
    pub encoder: T5Stack<B>,
    /// `decoder`.
    pub decoder: T5Stack<B>,
    /// `lm_head` (untied models).
    pub lm_head: Option<AdaptedLinear<B>>,
    /// Virtual tokens of prompt learning, prepended to the encoder's input embeddings.
    pub prompt: PromptSite<B>,
    /// The config.
    #[module(skip)]
    pub config: T5Config,
}

/// What [`T5ForConditionalGeneration::forward`] returns.
#[derive(Debug)]
pub struct Seq2SeqOutput<B: Backend> {
    /// `[batch, dec_len, vocab]`.
    pub logits: Tensor<B, 3>,
    /// The encoder's `last_hidden_state`, `[batch, src_len, d_model]`.
    pub encoder_last_hidden_state: Tensor<B, 3>,
}

impl<B: Backend> T5ForConditionalGeneration<B> {
    /// A randomly initialised model (lazily: nothing is allocated until used).
    pub fn new(config: &T5Config, device: &B::Device) -> Result<Self> {
        config.check_size()?;
        Ok(T5ForConditionalGeneration {
            shared: EmbeddingConfig::new(config.vocab_size, config.d_model).init(device),
            encoder: T5Stack::new(config, false, device)?,
            decoder: T5Stack::new(config, true, device)?,
            lm_head: (!config.tie_word_embeddings)
                .then(|| AdaptedLinear::new(config.d_model, config.vocab_size, false, device)),
            prompt: PromptSite::new(PromptGeometry {
                token_dim: config.d_model,
                num_layers: config.num_layers,
                num_attention_heads: config.num_heads,
                encoder_decoder: true,
                key_value_refusal: Some(
                    "PEFT 0.21.2's prefix tuning fails on (m)T5 under transformers 4.57.6 (a \
                     position-bias size mismatch in T5 self-attention when the decoder is deeper \
                     than the encoder, and a generate that disagrees with its own forward pass), \
                     so there is no reference to match; use prompt tuning or P-tuning on T5, or \
                     prefix tuning on BERT",
                ),
            }),
            config: config.clone(),
        })
    }

    /// Encodes `input_ids` `[batch, src_len]` with an optional attention mask. With a prompt
    /// adapter active, its virtual tokens come first (`[batch, virtual + src_len, d_model]`),
    /// as PEFT's `inputs_embeds`; the decoder extends the mask to match.
    pub fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let x = self.shared.forward(input_ids);
        let [b, _, _] = x.dims();
        match self.prompt.input_prefix(b) {
            None => self.encoder.forward(x, mask, None, None),
            Some(p) => {
                let x = Tensor::cat(vec![p, x], 1);
                let l = x.dims()[1];
                let mask = mask.map(|m| extend_mask(m, l));
                self.encoder.forward(x, mask, None, None)
            }
        }
    }

    /// Decoder step(s): logits `[batch, len, vocab]` for `decoder_input_ids`.
    pub fn decode(
        &self,
        decoder_input_ids: Tensor<B, 2, Int>,
        encoder_out: Tensor<B, 3>,
        encoder_mask: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut DecoderCache<B>>,
    ) -> Tensor<B, 3> {
        let encoder_mask = encoder_mask.map(|m| extend_mask(m, encoder_out.dims()[1]));
        let h = self.decoder.forward(
            self.shared.forward(decoder_input_ids),
            None,
            Some((encoder_out, encoder_mask)),
            cache,
        );
        self.lm_logits(h)
    }

    /// Decoder step(s) with a mask over the decoder's own positions, cached and new
    /// (`[batch, cache.len + len]`, 1 = attend): rows that joined a running batch later than
    /// others have their earlier slots masked, and compute exactly what they would alone (T5's
    /// position bias depends on distances only).
    pub fn decode_masked(
        &self,
        decoder_input_ids: Tensor<B, 2, Int>,
        encoder_out: Tensor<B, 3>,
        encoder_mask: Option<Tensor<B, 2, Int>>,
        decoder_mask: Tensor<B, 2, Int>,
        cache: &mut DecoderCache<B>,
    ) -> Tensor<B, 3> {
        let encoder_mask = encoder_mask.map(|m| extend_mask(m, encoder_out.dims()[1]));
        let h = self.decoder.forward(
            self.shared.forward(decoder_input_ids),
            Some(decoder_mask),
            Some((encoder_out, encoder_mask)),
            Some(cache),
        );
        self.lm_logits(h)
    }

    fn lm_logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let h = h.mul_scalar((self.config.d_model as f64).powf(-0.5));
                let w = self.shared.weight.val().transpose();
                peft_core::nn::linear(h, w, None)
            }
        }
    }

    /// Full forward pass (teacher forcing).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        decoder_input_ids: Tensor<B, 2, Int>,
    ) -> Seq2SeqOutput<B> {
        let enc = self.encode(input_ids, attention_mask.clone());
        let logits = self.decode(decoder_input_ids, enc.clone(), attention_mask, None);
        Seq2SeqOutput {
            logits,
            encoder_last_hidden_state: enc,
        }
    }

    /// Greedy decoding ([`crate::generation::greedy`]).
    pub fn generate_greedy(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        max_new_tokens: usize,
    ) -> Vec<Vec<usize>> {
        crate::generation::greedy(self, input_ids, attention_mask, max_new_tokens)
    }

    /// Beam search ([`crate::generation::beam`]).
    pub fn generate_beam(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        max_new_tokens: usize,
        num_beams: usize,
    ) -> Vec<Vec<usize>> {
        crate::generation::beam(self, input_ids, attention_mask, max_new_tokens, num_beams)
    }
}

impl<B: Backend> crate::generation::Seq2SeqGenerate<B> for T5ForConditionalGeneration<B> {
    type Cache = DecoderCache<B>;

    fn encode_source(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.encode(input_ids, attention_mask)
    }

    fn decode_step(
        &self,
        ids: Tensor<B, 2, Int>,
        encoder: Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: &mut DecoderCache<B>,
    ) -> Tensor<B, 3> {
        self.decode(ids, encoder, attention_mask, Some(cache))
    }

    fn reorder_cache(cache: &mut DecoderCache<B>, rows: Tensor<B, 1, Int>) {
        for kv in cache.self_kv.iter_mut() {
            kv.select_rows(rows.clone());
        }
    }

    fn special_tokens(&self) -> crate::generation::SpecialTokens {
        crate::generation::SpecialTokens {
            decoder_start: self.config.decoder_start(),
            eos: self.config.eos_token_id,
            pad: self.config.pad_token_id,
        }
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}

impl<B: Backend> T5ForConditionalGeneration<B> {
    /// The bottleneck sites of block `i` of a stack, as AdapterHub numbers them (decoder
    /// layers continue after the encoder's).
    fn block_sites(&self, decoder: bool, i: usize) -> Vec<SublayerSite> {
        let hidden = self.config.d_model;
        let (name, layer) = if decoder {
            ("decoder", self.encoder.block.len() + i)
        } else {
            ("encoder", i)
        };
        let p = format!("{name}.block.{i}.layer");
        let site = |idx: usize, kind| SublayerSite {
            path: format!("{p}.{idx}"),
            kind,
            layer,
            hidden,
        };
        if decoder {
            vec![
                site(0, SublayerKind::Attention),
                site(1, SublayerKind::CrossAttention),
                site(2, SublayerKind::Output),
            ]
        } else {
            vec![
                site(0, SublayerKind::Attention),
                site(1, SublayerKind::Output),
            ]
        }
    }
}

/// Writes T5's two site walks once for `&self` and once for `&mut self` from the same text
/// (`$m` is empty or `mut`), so the shared and mutable walks cannot drift apart.
macro_rules! t5_walks {
    ($linears:ident, $sublayers:ident $(, $m:tt)?) => {
        fn $linears(& $($m)? self, f: &mut dyn FnMut(&str, & $($m)? AdaptedLinear<B>)) {
            for (stack_name, stack) in [("encoder", & $($m)? self.encoder), ("decoder", & $($m)? self.decoder)] {
                for (i, blk) in (& $($m)? stack.block).into_iter().enumerate() {
                    let p = format!("{stack_name}.block.{i}.layer");
                    let a = & $($m)? blk.self_attention.attention;
                    for (n, l) in [("q", & $($m)? a.q), ("k", & $($m)? a.k), ("v", & $($m)? a.v), ("o", & $($m)? a.o)] {
                        f(&format!("{p}.0.SelfAttention.{n}"), l);
                    }
                    let mut ff_idx = 1;
                    if let Some(c) = & $($m)? blk.cross_attention {
                        let a = & $($m)? c.attention;
                        for (n, l) in [("q", & $($m)? a.q), ("k", & $($m)? a.k), ("v", & $($m)? a.v), ("o", & $($m)? a.o)] {
                            f(&format!("{p}.1.EncDecAttention.{n}"), l);
                        }
                        ff_idx = 2;
                    }
                    let ff = & $($m)? blk.ff;
                    for (n, l) in [("wi", & $($m)? ff.wi), ("wi_0", & $($m)? ff.wi_0), ("wi_1", & $($m)? ff.wi_1)] {
                        if let Some(l) = l {
                            f(&format!("{p}.{ff_idx}.DenseReluDense.{n}"), l);
                        }
                    }
                    f(&format!("{p}.{ff_idx}.DenseReluDense.wo"), & $($m)? ff.wo);
                }
            }
            if let Some(h) = & $($m)? self.lm_head {
                f("lm_head", h);
            }
        }

        fn $sublayers(& $($m)? self, f: &mut dyn FnMut(&SublayerSite, & $($m)? SublayerAdapters<B>)) {
            for decoder in [false, true] {
                let n = if decoder {
                    self.decoder.block.len()
                } else {
                    self.encoder.block.len()
                };
                for i in 0..n {
                    let sites = self.block_sites(decoder, i);
                    let stack = if decoder { & $($m)? self.decoder } else { & $($m)? self.encoder };
                    let blk = & $($m)? stack.block[i];
                    let mut adapters = vec![& $($m)? blk.self_attention.adapters];
                    if let Some(c) = & $($m)? blk.cross_attention {
                        adapters.push(& $($m)? c.adapters);
                    }
                    adapters.push(& $($m)? blk.ff.adapters);
                    for (s, a) in sites.iter().zip(adapters) {
                        f(s, a);
                    }
                }
            }
        }
    };
}

impl<B: Backend> AdapterHost<B> for T5ForConditionalGeneration<B> {
    t5_walks!(visit_linears, visit_sublayers);
    t5_walks!(visit_linears_mut, visit_sublayers_mut, mut);

    fn model_type(&self) -> Option<&str> {
        Some(&self.config.model_type)
    }

    fn model_class(&self) -> Option<&str> {
        Some(if self.config.model_type == "mt5" {
            "MT5ForConditionalGeneration"
        } else {
            "T5ForConditionalGeneration"
        })
    }

    fn output_heads(&self, _task: Option<TaskType>) -> Vec<String> {
        vec!["lm_head".to_string()]
    }

    fn visit_prompt(&self, f: &mut dyn FnMut(&PromptSite<B>)) {
        f(&self.prompt)
    }

    fn visit_prompt_mut(&mut self, f: &mut dyn FnMut(&mut PromptSite<B>)) {
        f(&mut self.prompt)
    }

    fn word_embeddings(&self) -> Option<Tensor<B, 2>> {
        Some(self.shared.weight.val())
    }
}

impl<B: Backend> HfParams<B> for T5ForConditionalGeneration<B> {
    fn visit_hf_params_mut(&mut self, f: &mut dyn FnMut(&str, HfParamMut<'_, B>)) {
        f("shared.weight", HfParamMut::Matrix(&mut self.shared.weight));
        self.visit_linears_mut(&mut |p, l| {
            f(
                &format!("{p}.weight"),
                HfParamMut::LinearWeight(&mut l.weight),
            );
            if let Some(b) = &mut l.bias {
                f(&format!("{p}.bias"), HfParamMut::Vector(b));
            }
        });
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (i, blk) in stack.block.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                f(
                    &format!("{p}.0.layer_norm.weight"),
                    HfParamMut::Vector(&mut blk.self_attention.layer_norm.weight),
                );
                if let Some(e) = &mut blk.self_attention.attention.relative_attention_bias {
                    f(
                        &format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                        HfParamMut::Matrix(&mut e.weight),
                    );
                }
                let mut ff_idx = 1;
                if let Some(c) = &mut blk.cross_attention {
                    f(
                        &format!("{p}.1.layer_norm.weight"),
                        HfParamMut::Vector(&mut c.layer_norm.weight),
                    );
                    ff_idx = 2;
                }
                f(
                    &format!("{p}.{ff_idx}.layer_norm.weight"),
                    HfParamMut::Vector(&mut blk.ff.layer_norm.weight),
                );
            }
            f(
                &format!("{stack_name}.final_layer_norm.weight"),
                HfParamMut::Vector(&mut stack.final_layer_norm.weight),
            );
        }
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("encoder.embed_tokens.weight", "shared.weight"),
            ("decoder.embed_tokens.weight", "shared.weight"),
        ];
        if self.lm_head.is_none() {
            v.push(("lm_head.weight", "shared.weight"));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    use super::KvCache;

    type Nd = NdArray<f32>;

    fn random(shape: [usize; 4]) -> Tensor<Nd, 4> {
        Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &Default::default())
    }

    /// The address of a tensor's first element.
    fn address(t: &Tensor<Nd, 4>) -> *const f32 {
        match t.clone().into_primitive().tensor() {
            burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().as_ptr(),
            _ => panic!("f32 expected"),
        }
    }

    /// Appending step by step holds what concatenating does; within the capacity the buffers
    /// are written in place (the same addresses), past it they double; selecting rows keeps
    /// the rows and the capacity.
    #[test]
    fn kv_cache_appends_in_place_and_equals_concatenation() {
        let (b, h, d) = (3, 2, 5);
        let (k0, v0) = (random([b, h, 4, d]), random([b, h, 4, d]));
        let mut cache = KvCache::new(k0.clone(), v0.clone());
        assert_eq!((cache.len(), cache.capacity()), (4, 4));
        let (mut keys, mut values) = (k0, v0);
        let mut addresses = Vec::new();
        for step in 0..20 {
            let (k, v) = (random([b, h, 1, d]), random([b, h, 1, d]));
            keys = Tensor::cat(vec![keys, k.clone()], 2);
            values = Tensor::cat(vec![values, v.clone()], 2);
            cache = cache.append(k, v);
            assert_eq!(cache.len(), 5 + step);
            cache
                .keys()
                .into_data()
                .assert_eq(&keys.clone().into_data(), true);
            cache
                .values()
                .into_data()
                .assert_eq(&values.clone().into_data(), true);
            addresses.push((cache.capacity(), address(&cache.k), address(&cache.v)));
        }
        // Capacities 16 (from 4), then 32; the addresses change only when the capacity does.
        assert_eq!(addresses.first().map(|a| a.0), Some(16));
        assert_eq!(addresses.last().map(|a| a.0), Some(32));
        for pair in addresses.windows(2) {
            if pair[0].0 == pair[1].0 {
                assert_eq!(
                    pair[0], pair[1],
                    "an append within the capacity moved a buffer"
                );
            }
        }
        let rows = Tensor::<Nd, 1, Int>::from_data(
            TensorData::new(vec![2i64, 0], [2]),
            &Default::default(),
        );
        cache.select_rows(rows.clone());
        assert_eq!(cache.capacity(), 32);
        cache
            .keys()
            .into_data()
            .assert_eq(&keys.select(0, rows.clone()).into_data(), true);
        cache
            .values()
            .into_data()
            .assert_eq(&values.select(0, rows).into_data(), true);
    }

    /// Decoding steps read the weights from their packed copies from the second step on
    /// ([`peft_core::ops::DecodePack`], turned on), and get the same logits, bit for bit, as steps whose
    /// copies are dropped before each step (so that every product runs in place), for 1 and
    /// 9 rows, with an unmerged LoRA adapter on `q` and `v`.
    #[test]
    fn decoding_with_packed_weights_equals_decoding_in_place() {
        use peft_core::config::TargetModules;
        use peft_core::{AdapterHost, InitLoraWeights, LoraConfig, PeftModel};

        use crate::generation::Seq2SeqGenerate;

        let device = Default::default();
        // Weights large enough for the decoding kernel (at least 32768 elements).
        let config = super::T5Config {
            vocab_size: 300,
            ..super::T5Config::preset_by_name("mt0-tiny").expect("preset")
        };
        let config = super::T5Config {
            d_model: 256,
            d_kv: 64,
            ..config
        };
        let base = super::T5ForConditionalGeneration::<Nd>::new(&config, &device).expect("model");
        let lora = LoraConfig {
            init_lora_weights: InitLoraWeights::Random,
            ..LoraConfig::new(8, 16.0, TargetModules::list(["q", "v"]))
        };
        let model = PeftModel::new(base, lora, "default")
            .expect("adapter")
            .base_model;
        model.visit_linears(&mut |_, l| l.decode_pack.on());
        let packed_bytes = |m: &super::T5ForConditionalGeneration<Nd>| {
            let mut bytes = 0;
            m.visit_linears(&mut |_, l| bytes += l.decode_pack.bytes());
            bytes
        };
        for rows in [1usize, 9] {
            let ids: Vec<i64> = (0..rows * 7).map(|i| (i * 37 % 290 + 3) as i64).collect();
            let ids = Tensor::<Nd, 2, Int>::from_data(TensorData::new(ids, [rows, 7]), &device);
            let enc = model.encode_source(ids, None);
            let run = |in_place: bool| {
                let mut cache = Default::default();
                let mut next = vec![0i64; rows];
                let mut steps = Vec::new();
                for _ in 0..4 {
                    if in_place {
                        model.visit_linears(&mut |_, l| l.decode_pack.clear());
                    }
                    let t = Tensor::<Nd, 2, Int>::from_data(
                        TensorData::new(next.clone(), [rows, 1]),
                        &device,
                    );
                    let logits = model.decode_step(t, enc.clone(), None, &mut cache);
                    next = peft_core::ops::argmax_last(logits.clone())
                        .into_iter()
                        .map(|t| t as i64)
                        .collect();
                    steps.push(logits.into_data());
                }
                steps
            };
            let in_place = run(true);
            assert_eq!(packed_bytes(&model), 0, "cleared before each step");
            let packed = run(false);
            if peft_gemm_packs() {
                assert!(
                    packed_bytes(&model) > 0,
                    "the decoder's weights were packed"
                );
            }
            for (step, (a, b)) in in_place.iter().zip(&packed).enumerate() {
                a.assert_eq(b, true);
                assert!(
                    a.iter::<f32>().all(f32::is_finite),
                    "{rows} rows, step {step}: finite logits"
                );
            }
        }
    }

    /// Whether this machine packs decoding weights (x86-64 with AVX2 and FMA, not turned off).
    fn peft_gemm_packs() -> bool {
        #[cfg(target_arch = "x86_64")]
        let cpu = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        cpu && ["PEFT_DECODE_PACK", "PEFT_GEMM_SMALL_M", "PEFT_GEMM_KERNEL"]
            .iter()
            .all(|v| std::env::var_os(v).is_none())
    }
}
