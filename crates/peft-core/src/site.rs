//! How a model exposes the places adapters can sit.
//!
//! A model implements [`AdapterHost`] once: one walk that yields every adapter site with its
//! Hugging Face module path. Everything else (targeting, attaching, merging, counting, collecting
//! tensors for checkpoints) is generic code over that walk.

use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::adapted_linear::AdaptedLinear;
use crate::config::TaskType;
use crate::prompt_site::PromptSite;
use crate::sublayer::SublayerAdapters;

/// Where in a transformer layer a bottleneck site sits (AdapterHub's `location_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SublayerKind {
    /// After the (self-)attention output: `mh_adapter`.
    Attention,
    /// After the decoder's cross-attention output: `cross_adapter`.
    CrossAttention,
    /// After the feed-forward output: `output_adapter`.
    Output,
}

/// One bottleneck site of a model: its Hugging Face module path, kind, and AdapterHub layer
/// index (decoder layers of encoder-decoder models count on from the encoder's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SublayerSite {
    /// HF module path of the sub-layer (`encoder.layer.0.output`,
    /// `decoder.block.1.layer.2`): AdapterHub keys are `<path>.adapters.<name>.<tensor>`.
    pub path: String,
    /// Placement.
    pub kind: SublayerKind,
    /// AdapterHub's layer index (for `leave_out` and per-layer `reduction_factor`).
    pub layer: usize,
    /// Hidden size at this site.
    pub hidden: usize,
}

/// A model whose layers can carry adapters.
pub trait AdapterHost<B: Backend>: Module<B> {
    /// Calls `f` with the Hugging Face module path and the layer, for every adaptable linear
    /// layer, in model order.
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>));

    /// Like [`visit_linears`](Self::visit_linears), mutably.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>));

    /// Calls `f` with every bottleneck site (sub-layer outputs where the residual is added), in
    /// model order. Models without sites keep the default (none).
    fn visit_sublayers(&self, f: &mut dyn FnMut(&SublayerSite, &SublayerAdapters<B>)) {
        let _ = f;
    }

    /// Like [`visit_sublayers`](Self::visit_sublayers), mutably.
    fn visit_sublayers_mut(&mut self, f: &mut dyn FnMut(&SublayerSite, &mut SublayerAdapters<B>)) {
        let _ = f;
    }

    /// Calls `f` with the model's prompt site, where virtual tokens enter (models without one
    /// keep the default: none, and prompt learning is refused).
    fn visit_prompt(&self, f: &mut dyn FnMut(&PromptSite<B>)) {
        let _ = f;
    }

    /// Like [`visit_prompt`](Self::visit_prompt), mutably.
    fn visit_prompt_mut(&mut self, f: &mut dyn FnMut(&mut PromptSite<B>)) {
        let _ = f;
    }

    /// The input word embeddings `[vocab, hidden]` (prompt tuning's `TEXT` init).
    fn word_embeddings(&self) -> Option<burn::tensor::Tensor<B, 2>> {
        None
    }

    /// The Hugging Face `model_type` (`t5`, `mt5`, `bert`): picks PEFT's default targets.
    fn model_type(&self) -> Option<&str> {
        None
    }

    /// The transformers class name (`BertModel`, `T5ForConditionalGeneration`), written into
    /// AdapterHub configs.
    fn model_class(&self) -> Option<&str> {
        None
    }

    /// Paths that `target_modules = "all-linear"` leaves out: the output embedding (LM head),
    /// or the classification head for `SEQ_CLS`, as PEFT decides.
    fn output_heads(&self, task: Option<TaskType>) -> Vec<String> {
        let _ = task;
        Vec::new()
    }

    /// The paths of every adaptable linear layer, in model order.
    fn linear_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_linears(&mut |p, _| out.push(p.to_string()));
        out
    }
}

/// Joins a module path prefix and a child name with a dot.
pub fn join_path(prefix: &str, child: &str) -> String {
    if prefix.is_empty() {
        child.to_string()
    } else {
        format!("{prefix}.{child}")
    }
}
