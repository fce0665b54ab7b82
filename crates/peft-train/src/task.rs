//! What a run learns: a [`Task`] turns examples into a loss and into predictions. Two are built
//! in: [`Seq2SeqLmTask`] (`SEQ_2_SEQ_LM`, T5/mT5/mt0: the label is generated as text) and
//! [`SeqClsTask`] (`SEQ_CLS`, BERT: the label is a class).

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use peft_core::AdapterHost;
use peft_core::train::masked_cross_entropy;
use peft_io::TextTokenizer;
use peft_models::{BertForSequenceClassification, T5ForConditionalGeneration};

use crate::data::{DataCollatorForSeq2Seq, Example, ids_tensor, int_tensor};
use crate::error::Result;

/// A micro-batch's loss.
pub struct StepLoss<B: Backend> {
    /// Mean loss over the counted targets.
    pub loss: Tensor<B, 1>,
    /// Targets counted (tokens for seq2seq, examples for classification).
    pub targets: usize,
    /// Real input tokens, for throughput.
    pub tokens: usize,
}

/// Loss and accuracy over a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss, weighted by targets.
    pub loss: f64,
    /// Share of examples whose prediction equals the label.
    pub accuracy: f64,
    /// Loss targets counted (tokens for seq2seq, labelled examples for classification).
    pub targets: usize,
    /// Examples evaluated.
    pub examples: usize,
}

/// A training objective over a model type.
pub trait Task {
    /// The model the task trains, on any backend.
    type Model<B: Backend>: AdapterHost<B> + Module<B>;

    /// The loss of one micro-batch.
    fn loss<B: Backend>(
        &self,
        model: &Self::Model<B>,
        batch: &[&Example],
        device: &B::Device,
    ) -> Result<StepLoss<B>>;

    /// The predicted label of each example.
    fn predict<B: Backend>(
        &self,
        model: &Self::Model<B>,
        data: &[Example],
        device: &B::Device,
    ) -> Result<Vec<String>>;

    /// The number of loss targets [`loss`](Self::loss) would count for `batch`, without
    /// running the model. Data-parallel workers weight their shard's mean loss by its share of
    /// the global micro-batch's targets, which makes N workers' summed gradient the one of a
    /// single process. The default counts examples, exact for a loss that is a mean over
    /// examples.
    fn count_targets(&self, batch: &[&Example]) -> Result<usize> {
        Ok(batch.len())
    }

    /// How an example is shown to the model (its prompt).
    fn render(&self, e: &Example) -> String {
        e.text.clone()
    }

    /// Mean loss over `data` (target-weighted) and accuracy of the predictions.
    fn evaluate<B: Backend>(
        &self,
        model: &Self::Model<B>,
        data: &[Example],
        batch_size: usize,
        device: &B::Device,
    ) -> Result<Evaluation> {
        let mut total = 0.0;
        let mut count = 0usize;
        let mut correct = 0usize;
        for chunk in data.chunks(batch_size.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let l = self.loss(model, &refs, device)?;
            total += l.loss.into_scalar().elem::<f64>() * l.targets as f64;
            count += l.targets;
            let preds = self.predict(model, chunk, device)?;
            correct += preds
                .iter()
                .zip(chunk)
                .filter(|(p, e)| p.trim() == e.label.trim())
                .count();
        }
        Ok(Evaluation {
            loss: total / count.max(1) as f64,
            accuracy: correct as f64 / data.len().max(1) as f64,
            targets: count,
            examples: data.len(),
        })
    }
}

/// Seq2seq LM (`SEQ_2_SEQ_LM`) on a T5-family model: batches from
/// [`DataCollatorForSeq2Seq`], predictions by greedy generation.
pub struct Seq2SeqLmTask<'a> {
    /// Builds the batches.
    pub collator: DataCollatorForSeq2Seq<'a>,
}

impl<'a> Seq2SeqLmTask<'a> {
    /// A task over `model`'s pad and decoder-start ids.
    pub fn new<B: Backend>(
        tokenizer: &'a TextTokenizer,
        model: &T5ForConditionalGeneration<B>,
    ) -> Self {
        let pad = model.config.pad_token_id.unwrap_or(0) as u32;
        let start = model.config.decoder_start() as u32;
        Seq2SeqLmTask {
            collator: DataCollatorForSeq2Seq::new(tokenizer, pad, start)
                .with_vocab_size(model.config.vocab_size),
        }
    }

    /// Sets the prompt template (`{text}` is replaced by each example's text).
    pub fn with_prompt_template(mut self, template: impl Into<String>) -> Self {
        self.collator = self.collator.with_prompt_template(template);
        self
    }

    /// Sets the source and target lengths (the target length also bounds generation).
    pub fn with_max_lengths(mut self, source: usize, target: usize) -> Self {
        self.collator = self.collator.with_max_lengths(source, target);
        self
    }
}

impl Task for Seq2SeqLmTask<'_> {
    type Model<B: Backend> = T5ForConditionalGeneration<B>;

    fn render(&self, e: &Example) -> String {
        self.collator.prompt(e)
    }

    fn count_targets(&self, batch: &[&Example]) -> Result<usize> {
        self.collator.count_targets(batch)
    }

    fn loss<B: Backend>(
        &self,
        model: &Self::Model<B>,
        batch: &[&Example],
        device: &B::Device,
    ) -> Result<StepLoss<B>> {
        let b = self.collator.collate::<B>(batch, device)?;
        let enc = model.encode(b.input_ids, Some(b.attention_mask.clone()));
        let logits = model.decode(b.decoder_input_ids, enc, Some(b.attention_mask), None);
        let (loss, targets) = masked_cross_entropy(logits, b.labels);
        Ok(StepLoss {
            loss,
            targets,
            tokens: b.tokens,
        })
    }

    fn predict<B: Backend>(
        &self,
        model: &Self::Model<B>,
        data: &[Example],
        device: &B::Device,
    ) -> Result<Vec<String>> {
        let c = &self.collator;
        let prompts: Vec<String> = data.iter().map(|e| c.prompt(e)).collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let batch = c
            .tokenizer
            .encode_batch(&refs, Some(c.max_source_length), c.pad_token_id)?;
        c.check_ids(batch.ids.iter().flatten())?;
        let out = model.generate_greedy(
            ids_tensor::<B>(&batch.ids, device),
            Some(ids_tensor::<B>(&batch.mask, device)),
            c.max_target_length,
        );
        out.iter()
            .map(|r| {
                let r: Vec<u32> = r.iter().map(|v| *v as u32).collect();
                Ok(c.tokenizer.decode(&r)?)
            })
            .collect()
    }
}

/// Sequence classification (`SEQ_CLS`) on a BERT-family model: the label strings are the
/// classes, in the order given (the CLI sorts the training data's distinct labels).
pub struct SeqClsTask<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The pad id.
    pub pad_token_id: u32,
    /// Class names, by class index.
    pub labels: Vec<String>,
    /// Tokens kept per text.
    pub max_length: usize,
}

impl<'a> SeqClsTask<'a> {
    /// A task with classes `labels` (pad id from `[PAD]`, 128 tokens).
    pub fn new(tokenizer: &'a TextTokenizer, labels: Vec<String>) -> Self {
        SeqClsTask {
            tokenizer,
            pad_token_id: tokenizer.token_id("[PAD]").unwrap_or(0),
            labels,
            max_length: 128,
        }
    }

    /// Sets the tokens kept per text.
    pub fn with_max_length(mut self, max_length: usize) -> Self {
        self.max_length = max_length;
        self
    }

    /// Loads a BERT model from an HF dir with a new head of `labels.len()` classes (drawn from
    /// the backend's seed) and returns it with the names of the newly initialised tensors.
    pub fn load_base<B: Backend>(
        &self,
        dir: &Path,
        device: &B::Device,
    ) -> Result<(BertForSequenceClassification<B>, Vec<String>)> {
        let mut config = peft_io::hf_model::read_bert_config(dir)?;
        config.num_labels = Some(self.labels.len());
        config.id2label = None;
        let mut model = BertForSequenceClassification::new(&config, device)?;
        let source = peft_io::open_weights(dir)?;
        let report = peft_io::load_hf_weights(&mut model, &source)?;
        Ok((model, report.newly_initialized))
    }

    /// Class logits `[batch, classes]` of `texts` and their real token count.
    fn logits<'t, B: Backend>(
        &self,
        model: &BertForSequenceClassification<B>,
        texts: impl Iterator<Item = &'t str>,
        device: &B::Device,
    ) -> Result<(Tensor<B, 2>, usize)> {
        let texts: Vec<&str> = texts.collect();
        let enc = self
            .tokenizer
            .encode_batch(&texts, Some(self.max_length), self.pad_token_id)?;
        let tokens = enc.mask.iter().flatten().map(|m| *m as usize).sum();
        let (logits, _) = model.forward(
            ids_tensor::<B>(&enc.ids, device),
            Some(ids_tensor::<B>(&enc.mask, device)),
            None,
        );
        Ok((logits, tokens))
    }

    fn class_of(&self, label: &str) -> i64 {
        self.labels
            .iter()
            .position(|l| l == label)
            .map_or(-100, |i| i as i64)
    }
}

impl Task for SeqClsTask<'_> {
    type Model<B: Backend> = BertForSequenceClassification<B>;

    fn count_targets(&self, batch: &[&Example]) -> Result<usize> {
        Ok(batch
            .iter()
            .filter(|e| self.class_of(&e.label) >= 0)
            .count())
    }

    fn loss<B: Backend>(
        &self,
        model: &Self::Model<B>,
        batch: &[&Example],
        device: &B::Device,
    ) -> Result<StepLoss<B>> {
        let (logits, tokens) = self.logits(model, batch.iter().map(|e| e.text.as_str()), device)?;
        let targets: Vec<i64> = batch.iter().map(|e| self.class_of(&e.label)).collect();
        let [b, c] = logits.dims();
        let (loss, n) = masked_cross_entropy(
            logits.reshape([b, 1, c]),
            int_tensor::<B>(&[targets], device).reshape([b, 1]),
        );
        Ok(StepLoss {
            loss,
            targets: n,
            tokens,
        })
    }

    fn predict<B: Backend>(
        &self,
        model: &Self::Model<B>,
        data: &[Example],
        device: &B::Device,
    ) -> Result<Vec<String>> {
        let (logits, _) = self.logits(model, data.iter().map(|e| e.text.as_str()), device)?;
        let best: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("argmax ids");
        Ok(best
            .into_iter()
            .map(|i| self.labels[i as usize].clone())
            .collect())
    }
}
