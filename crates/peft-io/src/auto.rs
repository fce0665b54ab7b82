//! One way to load every model: [`load_pretrained::<M>`](load_pretrained) for a model type you
//! name, and [`AutoModel`] for a directory whose `config.json` decides (transformers'
//! `AutoModel` / `AutoModelForSeq2SeqLM` / `AutoModelForSequenceClassification`).

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::TaskType;
use peft_models::{BertForSequenceClassification, BertModel, HfParams, T5ForConditionalGeneration};

use crate::error::{IoError, Result};
use crate::hf_model::{
    LoadReport, load_hf_weights, model_type, open_weights, read_bert_config, read_json,
    read_t5_config,
};

/// A model type built from an HF directory's `config.json` (lazily: nothing is allocated until
/// the weights are assigned).
pub trait FromPretrained<B: Backend>: HfParams<B> + Sized {
    /// Builds the architecture `dir/config.json` describes.
    fn from_config(dir: &Path, device: &B::Device) -> Result<Self>;
}

fn model_err(dir: &Path) -> impl FnOnce(peft_models::ModelError) -> IoError {
    let path = dir.join("config.json");
    move |source| IoError::Model { path, source }
}

impl<B: Backend> FromPretrained<B> for T5ForConditionalGeneration<B> {
    fn from_config(dir: &Path, device: &B::Device) -> Result<Self> {
        T5ForConditionalGeneration::new(&read_t5_config(dir)?, device).map_err(model_err(dir))
    }
}

impl<B: Backend> FromPretrained<B> for BertModel<B> {
    fn from_config(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = read_bert_config(dir)?;
        // The pooler exists when the checkpoint has one.
        let has_pooler = open_weights(dir)?
            .names()
            .iter()
            .any(|n| n.ends_with("pooler.dense.weight"));
        BertModel::new(&config, has_pooler, device).map_err(model_err(dir))
    }
}

impl<B: Backend> FromPretrained<B> for BertForSequenceClassification<B> {
    fn from_config(dir: &Path, device: &B::Device) -> Result<Self> {
        BertForSequenceClassification::new(&read_bert_config(dir)?, device).map_err(model_err(dir))
    }
}

/// Loads model type `M` from an HF directory (`config.json` + `model.safetensors`, a sharded
/// index, or `pytorch_model.bin` through the pickle gate), as transformers'
/// `M.from_pretrained(dir)` does.
///
/// ```
/// use burn::backend::NdArray;
/// use peft_models::T5ForConditionalGeneration;
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/mt5");
/// let (t5, _) = peft_io::load_pretrained::<NdArray, T5ForConditionalGeneration<NdArray>>(
///     &dir,
///     &Default::default(),
/// )?;
/// assert_eq!(t5.config.model_type, "mt5");
/// # Ok::<(), peft_io::IoError>(())
/// ```
pub fn load_pretrained<B: Backend, M: FromPretrained<B>>(
    dir: &Path,
    device: &B::Device,
) -> Result<(M, LoadReport)> {
    let mut model = M::from_config(dir, device)?;
    let source = open_weights(dir)?;
    let report = load_hf_weights(&mut model, &source)?;
    Ok((model, report))
}

/// A model whose type the directory's `config.json` decides.
#[allow(clippy::large_enum_variant)]
pub enum AutoModel<B: Backend> {
    /// `t5` / `mt5` (T5, mt0, T0): `T5ForConditionalGeneration`.
    T5(T5ForConditionalGeneration<B>),
    /// `bert` without a classification head.
    Bert(BertModel<B>),
    /// `bert` with a classification head.
    BertForSequenceClassification(BertForSequenceClassification<B>),
}

impl<B: Backend> AutoModel<B> {
    /// Loads `dir` as the class its `config.json` names (`architectures`), or as `task`
    /// requires (`SEQ_CLS` takes a classification head on a BERT encoder).
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use peft_io::AutoModel;
    /// let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    /// let (m, _) = AutoModel::<NdArray>::from_pretrained(&fixtures.join("t5/mt5"), None, &Default::default())?;
    /// assert!(matches!(m, AutoModel::T5(_)));
    /// let (m, _) = AutoModel::<NdArray>::from_pretrained(&fixtures.join("bert/bert_cls"), None, &Default::default())?;
    /// assert!(matches!(m, AutoModel::BertForSequenceClassification(_)));
    /// # Ok::<(), peft_io::IoError>(())
    /// ```
    pub fn from_pretrained(
        dir: &Path,
        task: Option<TaskType>,
        device: &B::Device,
    ) -> Result<(Self, LoadReport)> {
        let mt = model_type(dir)?;
        match mt.as_str() {
            "t5" | "mt5" => {
                let (m, r) = load_pretrained(dir, device)?;
                Ok((AutoModel::T5(m), r))
            }
            "bert" => {
                let config = read_json(&dir.join("config.json"))?;
                let classifier = config["architectures"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|c| c == "BertForSequenceClassification"));
                if task == Some(TaskType::SeqCls) || (task.is_none() && classifier) {
                    let (m, r) = load_pretrained(dir, device)?;
                    Ok((AutoModel::BertForSequenceClassification(m), r))
                } else {
                    let (m, r) = load_pretrained(dir, device)?;
                    Ok((AutoModel::Bert(m), r))
                }
            }
            other => Err(IoError::Model {
                path: dir.join("config.json"),
                source: peft_models::ModelError::Config(format!(
                    "model_type {other:?} is not supported (t5, mt5, bert)"
                )),
            }),
        }
    }
}
