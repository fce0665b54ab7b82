//! BERT (`BertModel`, `BertForSequenceClassification`), numerically equal to transformers'.
//!
//! Post-norm encoder with absolute position and token-type embeddings, LayerNorm (eps from the
//! config, 1e-12 by default), exact-erf GELU (`hidden_act: gelu`), scaled dot-product attention
//! with padding masks, a tanh pooler over `[CLS]`, and a linear classifier head. Module paths
//! are Hugging Face's: `bert.encoder.layer.0.attention.self.query`, `classifier`; a bare
//! `BertModel` (e.g. all-MiniLM-L6-v2) has no `bert.` prefix, as in transformers.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::Dropout;
use peft_core::nn::LayerNorm;
use peft_core::ops;
use peft_core::{
    AdaptedLinear, AdapterHost, PromptGeometry, PromptSite, SublayerAdapters, SublayerKind,
    SublayerSite, TaskType,
};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::hf::{HfParamMut, HfParams};

fn default_vocab() -> usize {
    30522
}
fn default_hidden() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_inter() -> usize {
    3072
}
fn default_act() -> String {
    "gelu".into()
}
fn default_drop() -> f64 {
    0.1
}
fn default_pos() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type() -> String {
    "bert".into()
}
fn default_pet() -> String {
    "absolute".into()
}

/// The fields of a BERT `config.json` this implementation uses, with transformers' defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// `bert`.
    #[serde(default = "default_type")]
    pub model_type: String,
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Hidden size.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Encoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Feed-forward inner size.
    #[serde(default = "default_inter")]
    pub intermediate_size: usize,
    /// `gelu` (exact), `gelu_new`, `relu`, `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Residual and embedding dropout.
    #[serde(default = "default_drop")]
    pub hidden_dropout_prob: f64,
    /// Attention-probability dropout.
    #[serde(default = "default_drop")]
    pub attention_probs_dropout_prob: f64,
    /// Positions.
    #[serde(default = "default_pos")]
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is implemented.
    #[serde(default = "default_pet")]
    pub position_embedding_type: String,
    /// Classifier dropout (default: `hidden_dropout_prob`).
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Labels of the classification head.
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Label names (their count gives `num_labels` when that is absent).
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
}

impl BertConfig {
    /// An estimate of the bytes of activations a forward pass over `batch` rows of
    /// `seq_len` tokens holds at its peak (f32); with `training`, every layer's are kept for
    /// the backward pass. Nothing is allocated.
    pub fn activation_bytes(&self, batch: usize, seq_len: usize, training: bool) -> u128 {
        let (b, l) = (batch as u128, seq_len as u128);
        let (h, d, ff) = (
            self.num_attention_heads as u128,
            self.hidden_size as u128,
            self.intermediate_size as u128,
        );
        let layer = 3 * b * h * l * l + b * l * (10 * d + 2 * ff);
        let layers = if training {
            self.num_hidden_layers as u128 * layer
        } else {
            layer
        };
        4 * (layers + 2 * b * l * d)
    }

    /// Parses `config.json`, refusing other model types and unsupported options.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: BertConfig = crate::parse_config(text)?;
        if c.model_type != "bert" {
            return Err(ModelError::WrongModelType {
                expected: "bert",
                found: c.model_type,
            });
        }
        if c.position_embedding_type != "absolute" {
            return Err(ModelError::Config(format!(
                "position_embedding_type {:?} is not supported (absolute)",
                c.position_embedding_type
            )));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ModelError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        c.act()?;
        crate::check_size(
            &[("num_hidden_layers", c.num_hidden_layers)],
            (c.vocab_size as u128 + c.max_position_embeddings as u128) * c.hidden_size as u128
                + c.num_hidden_layers as u128
                    * (4 * c.hidden_size as u128 * c.hidden_size as u128
                        + 2 * c.hidden_size as u128 * c.intermediate_size as u128),
        )?;
        Ok(c)
    }

    /// Labels of the classification head (`num_labels`, else the size of `id2label`, else 2).
    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(2)
    }

    fn act(&self) -> Result<BertAct> {
        Ok(match self.hidden_act.as_str() {
            "gelu" => BertAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => BertAct::GeluTanh,
            "relu" => BertAct::Relu,
            "silu" | "swish" => BertAct::Silu,
            other => {
                return Err(ModelError::Config(format!(
                    "unsupported hidden_act {other:?}"
                )));
            }
        })
    }

    fn preset(hidden: usize, layers: usize, heads: usize) -> Self {
        BertConfig {
            model_type: "bert".into(),
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
            classifier_dropout: None,
            num_labels: Some(2),
            id2label: None,
            pad_token_id: Some(0),
        }
    }

    /// `bert-base-uncased`, `bert-large-uncased` (and `-cased`), `minilm` (all-MiniLM-L6-v2).
    pub fn preset_by_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let name = name.rsplit('/').next().unwrap_or(&name).to_string();
        Some(match name.as_str() {
            "bert-base-uncased" | "bert-base-cased" | "bert-base" => Self::preset(768, 12, 12),
            "bert-large-uncased" | "bert-large-cased" | "bert-large" => Self::preset(1024, 24, 16),
            "minilm" | "all-minilm-l6-v2" => Self {
                intermediate_size: 1536,
                ..Self::preset(384, 6, 12)
            },
            _ => return None,
        })
    }

    /// Names accepted by [`preset_by_name`](Self::preset_by_name).
    pub const PRESETS: &'static [&'static str] = &[
        "bert-base-uncased",
        "bert-large-uncased",
        "bert-base",
        "bert-large",
        "minilm",
    ];
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BertAct {
    /// Exact GELU (erf).
    Gelu,
    /// Tanh-approximated GELU.
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU.
    Silu,
}

impl BertAct {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            BertAct::Gelu => gelu(x),
            BertAct::GeluTanh => peft_core::nn::gelu_tanh(x),
            BertAct::Relu => relu(x),
            BertAct::Silu => silu(x),
        }
    }
}

/// BERT's LayerNorm (`weight`, `bias`, `layer_norm_eps`): the shared [`LayerNorm`].
pub type BertLayerNorm<B> = LayerNorm<B>;

/// `embeddings`.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// `word_embeddings`.
    pub word_embeddings: Embedding<B>,
    /// `position_embeddings`.
    pub position_embeddings: Embedding<B>,
    /// `token_type_embeddings`.
    pub token_type_embeddings: Embedding<B>,
    /// `LayerNorm`.
    pub layer_norm: BertLayerNorm<B>,
    /// Dropout.
    pub dropout: Dropout,
}

/// One encoder layer (`encoder.layer.N`).
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// `attention.self.query`.
    pub query: AdaptedLinear<B>,
    /// `attention.self.key`.
    pub key: AdaptedLinear<B>,
    /// `attention.self.value`.
    pub value: AdaptedLinear<B>,
    /// `attention.output.dense`.
    pub attention_output: AdaptedLinear<B>,
    /// `attention.output.LayerNorm`.
    pub attention_norm: BertLayerNorm<B>,
    /// `intermediate.dense`.
    pub intermediate: AdaptedLinear<B>,
    /// `output.dense`.
    pub output: AdaptedLinear<B>,
    /// `output.LayerNorm`.
    pub output_norm: BertLayerNorm<B>,
    /// Bottleneck adapters after the attention output (`attention.output`, AdapterHub's
    /// `mh_adapter`).
    pub attention_adapters: SublayerAdapters<B>,
    /// Bottleneck adapters after the feed-forward output (`output`, `output_adapter`).
    pub output_adapters: SublayerAdapters<B>,
    /// Attention-probability dropout.
    pub attention_dropout: Dropout,
    /// Residual dropout.
    pub dropout: Dropout,
    /// Heads.
    pub heads: usize,
    /// Activation.
    #[module(skip)]
    pub act: BertAct,
}

impl<B: Backend> BertLayer<B> {
    fn new(c: &BertConfig, device: &B::Device) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |i, o| AdaptedLinear::new(i, o, true, device);
        Ok(BertLayer {
            query: lin(h, h),
            key: lin(h, h),
            value: lin(h, h),
            attention_output: lin(h, h),
            attention_norm: BertLayerNorm::new(h, c.layer_norm_eps, device),
            intermediate: lin(h, c.intermediate_size),
            output: lin(c.intermediate_size, h),
            output_norm: BertLayerNorm::new(h, c.layer_norm_eps, device),
            attention_adapters: SublayerAdapters::new(),
            output_adapters: SublayerAdapters::new(),
            attention_dropout: Dropout::new(c.attention_probs_dropout_prob),
            dropout: Dropout::new(c.hidden_dropout_prob),
            heads: c.num_attention_heads,
            act: c.act()?,
        })
    }

    /// One layer; `prefix` holds keys and values `[batch, heads, n, head_dim]` that come before
    /// the layer's own (prefix tuning's past key/values), `mask_bias` covers both.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        mask_bias: Tensor<B, 4>,
        prefix: Option<&(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [b, l, h] = x.dims();
        let d = h / self.heads;
        let split = |t: Tensor<B, 3>| ops::reshape(t, [b, l, self.heads, d]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let mut k = split(self.key.forward(x.clone()));
        let mut v = split(self.value.forward(x.clone()));
        if let Some((pk, pv)) = prefix {
            k = Tensor::cat(vec![pk.clone(), k], 2);
            v = Tensor::cat(vec![pv.clone(), v], 2);
        }
        let scores = ops::matmul(q, k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        let probs = self
            .attention_dropout
            .forward(ops::softmax_biased(scores, mask_bias));
        let ctx = ops::reshape(ops::matmul(probs, v).swap_dims(1, 2), [b, l, h]);
        // AdapterHub's `bottleneck_layer_forward(hidden, input_tensor, LayerNorm)`: with no
        // active adapter, `LayerNorm(hidden + input)`.
        let attn = self.attention_adapters.forward(
            self.dropout.forward(self.attention_output.forward(ctx)),
            x,
            Some(&|t| self.attention_norm.forward(t)),
        );
        let inter = self.act.apply(self.intermediate.forward(attn.clone()));
        self.output_adapters.forward(
            self.dropout.forward(self.output.forward(inter)),
            attn,
            Some(&|t| self.output_norm.forward(t)),
        )
    }
}

/// `BertModel`: embeddings, encoder, and the optional pooler.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    /// `embeddings`.
    pub embeddings: BertEmbeddings<B>,
    /// `encoder.layer`.
    pub layer: Vec<BertLayer<B>>,
    /// `pooler.dense`.
    pub pooler: Option<AdaptedLinear<B>>,
    /// Virtual tokens of prompt learning: rows before the word embeddings, or keys and values
    /// before each layer's own.
    pub prompt: PromptSite<B>,
    /// The config.
    #[module(skip)]
    pub config: BertConfig,
}

/// `last_hidden_state` and `pooler_output`.
#[derive(Debug)]
pub struct BertOutput<B: Backend> {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[batch, hidden]` (tanh of the pooler over `[CLS]`), when the model has a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
}

/// Writes BertModel's two site walks once for `&self` and once for `&mut self` from the same
/// text (`$m` is empty or `mut`), so the shared and mutable walks cannot drift apart.
macro_rules! bert_walks {
    ($linears:ident, $sublayers:ident $(, $m:tt)?) => {
        fn $linears(& $($m)? self, prefix: &str, f: &mut dyn FnMut(&str, & $($m)? AdaptedLinear<B>)) {
            for (i, l) in (& $($m)? self.layer).into_iter().enumerate() {
                let p = format!("{prefix}encoder.layer.{i}");
                f(&format!("{p}.attention.self.query"), & $($m)? l.query);
                f(&format!("{p}.attention.self.key"), & $($m)? l.key);
                f(&format!("{p}.attention.self.value"), & $($m)? l.value);
                f(&format!("{p}.attention.output.dense"), & $($m)? l.attention_output);
                f(&format!("{p}.intermediate.dense"), & $($m)? l.intermediate);
                f(&format!("{p}.output.dense"), & $($m)? l.output);
            }
            if let Some(p) = & $($m)? self.pooler {
                f(&format!("{prefix}pooler.dense"), p);
            }
        }

        fn $sublayers(
            & $($m)? self,
            prefix: &str,
            f: &mut dyn FnMut(&SublayerSite, & $($m)? SublayerAdapters<B>),
        ) {
            for i in 0..self.layer.len() {
                let [a, o] = self.sites(prefix, i);
                let l = & $($m)? self.layer[i];
                f(&a, & $($m)? l.attention_adapters);
                f(&o, & $($m)? l.output_adapters);
            }
        }
    };
}

impl<B: Backend> BertModel<B> {
    /// A randomly initialised model (lazily).
    pub fn new(config: &BertConfig, with_pooler: bool, device: &B::Device) -> Result<Self> {
        let h = config.hidden_size;
        let mut layer = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layer.push(BertLayer::new(config, device)?);
        }
        Ok(BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h).init(device),
                layer_norm: BertLayerNorm::new(h, config.layer_norm_eps, device),
                dropout: Dropout::new(config.hidden_dropout_prob),
            },
            layer,
            pooler: with_pooler.then(|| AdaptedLinear::new(h, h, true, device)),
            prompt: PromptSite::new(PromptGeometry {
                token_dim: h,
                num_layers: config.num_hidden_layers,
                num_attention_heads: config.num_attention_heads,
                encoder_decoder: false,
                key_value_refusal: None,
            }),
            config: config.clone(),
        })
    }

    /// Encodes `input_ids` `[batch, seq]` (mask: 1 = token, 0 = padding; token types default 0).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
    ) -> BertOutput<B> {
        let device = input_ids.device();
        let [b, l] = input_ids.dims();
        let e = &self.embeddings;
        let mut words = e.word_embeddings.forward(input_ids);
        let mut types = token_type_ids.unwrap_or_else(|| Tensor::zeros([b, l], &device));
        let mut mask = attention_mask;
        // Prompt tuning / P-tuning: virtual tokens first, token type 0, positions from 0 (PEFT's
        // `inputs_embeds`). Prefix tuning: keys and values before each layer's own, positions
        // from the prefix's length on (transformers' `past_key_values_length`).
        if let Some(p) = self.prompt.input_prefix(b) {
            let n = p.dims()[1];
            words = Tensor::cat(vec![p, words], 1);
            types = Tensor::cat(vec![Tensor::zeros([b, n], &device), types], 1);
            mask = mask.map(|m| Tensor::cat(vec![Tensor::ones([b, n], &device), m], 1));
        }
        let prefix = self.prompt.key_value_prefix(b);
        let past = self.prompt.key_value_len();
        let l = words.dims()[1];
        let positions = Tensor::<B, 1, Int>::arange(past as i64..(past + l) as i64, &device)
            .reshape([1, l])
            .expand([b, l]);
        let x = words
            + e.token_type_embeddings.forward(types)
            + e.position_embeddings.forward(positions);
        let mut h = e.dropout.forward(e.layer_norm.forward(x));
        let keys = past + l;
        let mask_bias = match mask {
            Some(m) => {
                let m = if past > 0 {
                    Tensor::cat(vec![Tensor::ones([b, past], &device), m], 1)
                } else {
                    m
                };
                Tensor::<B, 4>::zeros([b, 1, 1, keys], &device)
                    .mask_fill(m.equal_elem(0).reshape([b, 1, 1, keys]), f32::MIN)
            }
            None => Tensor::zeros([b, 1, 1, keys], &device),
        };
        for (i, layer) in self.layer.iter().enumerate() {
            h = layer.forward(h, mask_bias.clone(), prefix.as_ref().map(|p| &p[i]));
        }
        let pooler_output = self.pooler.as_ref().map(|p| {
            let cls = h
                .clone()
                .narrow(1, 0, 1)
                .reshape([b, self.config.hidden_size]);
            p.forward(cls).tanh()
        });
        BertOutput {
            last_hidden_state: h,
            pooler_output,
        }
    }

    bert_walks!(walk, walk_sublayers);
    bert_walks!(walk_mut, walk_sublayers_mut, mut);

    fn sites(&self, prefix: &str, i: usize) -> [SublayerSite; 2] {
        let p = format!("{prefix}encoder.layer.{i}");
        let hidden = self.config.hidden_size;
        [
            SublayerSite {
                path: format!("{p}.attention.output"),
                kind: SublayerKind::Attention,
                layer: i,
                hidden,
            },
            SublayerSite {
                path: format!("{p}.output"),
                kind: SublayerKind::Output,
                layer: i,
                hidden,
            },
        ]
    }

    fn hf_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, HfParamMut<'_, B>)) {
        let e = &mut self.embeddings;
        for (n, emb) in [
            ("word_embeddings", &mut e.word_embeddings),
            ("position_embeddings", &mut e.position_embeddings),
            ("token_type_embeddings", &mut e.token_type_embeddings),
        ] {
            f(
                &format!("{prefix}embeddings.{n}.weight"),
                HfParamMut::Matrix(&mut emb.weight),
            );
        }
        norm_params(
            &format!("{prefix}embeddings.LayerNorm"),
            &mut e.layer_norm,
            f,
        );
        for (i, l) in self.layer.iter_mut().enumerate() {
            let p = format!("{prefix}encoder.layer.{i}");
            norm_params(
                &format!("{p}.attention.output.LayerNorm"),
                &mut l.attention_norm,
                f,
            );
            norm_params(&format!("{p}.output.LayerNorm"), &mut l.output_norm, f);
        }
        self.walk_mut(prefix, &mut |p, l| linear_params(p, l, f));
    }
}

fn norm_params<B: Backend>(
    path: &str,
    n: &mut BertLayerNorm<B>,
    f: &mut dyn FnMut(&str, HfParamMut<'_, B>),
) {
    f(&format!("{path}.weight"), HfParamMut::Vector(&mut n.weight));
    f(&format!("{path}.bias"), HfParamMut::Vector(&mut n.bias));
}

fn linear_params<B: Backend>(
    path: &str,
    l: &mut AdaptedLinear<B>,
    f: &mut dyn FnMut(&str, HfParamMut<'_, B>),
) {
    f(
        &format!("{path}.weight"),
        HfParamMut::LinearWeight(&mut l.weight),
    );
    if let Some(b) = &mut l.bias {
        f(&format!("{path}.bias"), HfParamMut::Vector(b));
    }
}

impl<B: Backend> AdapterHost<B> for BertModel<B> {
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) {
        self.walk("", f)
    }
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) {
        self.walk_mut("", f)
    }
    fn visit_sublayers(&self, f: &mut dyn FnMut(&SublayerSite, &SublayerAdapters<B>)) {
        self.walk_sublayers("", f)
    }
    fn visit_sublayers_mut(&mut self, f: &mut dyn FnMut(&SublayerSite, &mut SublayerAdapters<B>)) {
        self.walk_sublayers_mut("", f)
    }
    fn visit_prompt(&self, f: &mut dyn FnMut(&PromptSite<B>)) {
        f(&self.prompt)
    }
    fn visit_prompt_mut(&mut self, f: &mut dyn FnMut(&mut PromptSite<B>)) {
        f(&mut self.prompt)
    }
    fn word_embeddings(&self) -> Option<Tensor<B, 2>> {
        Some(self.embeddings.word_embeddings.weight.val())
    }
    fn model_class(&self) -> Option<&str> {
        Some("BertModel")
    }
    fn model_type(&self) -> Option<&str> {
        Some("bert")
    }
}

impl<B: Backend> HfParams<B> for BertModel<B> {
    fn visit_hf_params_mut(&mut self, f: &mut dyn FnMut(&str, HfParamMut<'_, B>)) {
        self.hf_params("", f)
    }
    fn base_model_prefix(&self) -> Option<&'static str> {
        Some("bert")
    }
}

/// `BertForSequenceClassification`: pooled `[CLS]`, dropout, linear `classifier`.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification<B: Backend> {
    /// `bert`.
    pub bert: BertModel<B>,
    /// `classifier`, `[hidden] -> [num_labels]`.
    pub classifier: AdaptedLinear<B>,
    /// Classifier dropout.
    pub dropout: Dropout,
}

impl<B: Backend> BertForSequenceClassification<B> {
    /// A randomly initialised model (lazily).
    pub fn new(config: &BertConfig, device: &B::Device) -> Result<Self> {
        let p = config
            .classifier_dropout
            .unwrap_or(config.hidden_dropout_prob);
        Ok(BertForSequenceClassification {
            bert: BertModel::new(config, true, device)?,
            classifier: AdaptedLinear::new(config.hidden_size, config.labels(), true, device),
            dropout: Dropout::new(p),
        })
    }

    /// Logits `[batch, num_labels]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
    ) -> (Tensor<B, 2>, BertOutput<B>) {
        let out = self.bert.forward(input_ids, attention_mask, token_type_ids);
        let pooled = out
            .pooler_output
            .clone()
            .expect("classification BERT has a pooler");
        (self.classifier.forward(self.dropout.forward(pooled)), out)
    }
}

impl<B: Backend> AdapterHost<B> for BertForSequenceClassification<B> {
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) {
        self.bert.walk("bert.", f);
        f("classifier", &self.classifier);
    }
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) {
        self.bert.walk_mut("bert.", f);
        f("classifier", &mut self.classifier);
    }
    fn visit_sublayers(&self, f: &mut dyn FnMut(&SublayerSite, &SublayerAdapters<B>)) {
        self.bert.walk_sublayers("bert.", f)
    }
    fn visit_sublayers_mut(&mut self, f: &mut dyn FnMut(&SublayerSite, &mut SublayerAdapters<B>)) {
        self.bert.walk_sublayers_mut("bert.", f)
    }
    fn model_class(&self) -> Option<&str> {
        Some("BertForSequenceClassification")
    }
    fn visit_prompt(&self, f: &mut dyn FnMut(&PromptSite<B>)) {
        f(&self.bert.prompt)
    }
    fn visit_prompt_mut(&mut self, f: &mut dyn FnMut(&mut PromptSite<B>)) {
        f(&mut self.bert.prompt)
    }
    fn word_embeddings(&self) -> Option<Tensor<B, 2>> {
        Some(self.bert.embeddings.word_embeddings.weight.val())
    }
    fn model_type(&self) -> Option<&str> {
        Some("bert")
    }
    /// PEFT's `all-linear` leaves the classifier out for `SEQ_CLS` (it is a `modules_to_save`).
    fn output_heads(&self, task: Option<TaskType>) -> Vec<String> {
        match task {
            Some(TaskType::SeqCls) => vec!["classifier".into()],
            _ => Vec::new(),
        }
    }
}

impl<B: Backend> HfParams<B> for BertForSequenceClassification<B> {
    fn visit_hf_params_mut(&mut self, f: &mut dyn FnMut(&str, HfParamMut<'_, B>)) {
        self.bert.hf_params("bert.", f);
        linear_params("classifier", &mut self.classifier, f);
    }
    fn base_model_prefix(&self) -> Option<&'static str> {
        Some("bert")
    }
    /// A classifier on top of a bare encoder checkpoint starts fresh; so does a missing pooler.
    fn may_be_newly_initialized(&self, name: &str) -> bool {
        name.starts_with("classifier.") || name.starts_with("bert.pooler.")
    }
}
