//! `peft train`: seq2seq LoRA fine-tuning with the care of Hugging Face's `Trainer`.
//!
//! AdamW over adapter parameters only (the frozen base has no gradients and no optimizer state),
//! linear warmup and decay, global gradient-norm clipping, gradient accumulation, labels padded
//! with -100 and masked out of the loss, per-epoch evaluation (loss, and accuracy by greedy
//! generation), adapter-only checkpoints with optimizer and trainer state, `--resume`, Ctrl-C
//! saving a checkpoint, a NaN/Inf guard, metrics as JSONL. Runs are deterministic for a seed:
//! the data order comes from (seed, epoch) and dropout is reseeded from (seed, micro-step), so a
//! resumed run ends where an uninterrupted one does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use clap::Args;
use peft_core::train::{LinearSchedule, clip_grad_norm, masked_cross_entropy};
use peft_core::{AdapterConfig, AdapterHost, PeftModel, TaskType};
use peft_io::TextTokenizer;
use peft_models::{BertForSequenceClassification, HfParams, T5Config, T5ForConditionalGeneration};
use serde_json::json;

use crate::LoraArgs;
use crate::data::{Example, SplitMix, apply_template, read_examples, seq2seq_batch};

/// `peft train` options (HF `Seq2SeqTrainingArguments` names).
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// A preset (`mt0-tiny`, `mt0-small`, ...; randomly initialised from --seed) or an HF model dir.
    #[arg(long)]
    pub model: String,
    /// tokenizer.json (default: the model dir's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training data (JSONL or CSV).
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluation data (JSONL or CSV).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Where the adapter, checkpoints and metrics go.
    #[arg(long)]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Source tokens kept (truncation keeps the final `</s>`).
    #[arg(long, default_value_t = 128)]
    pub max_source_length: usize,
    /// Target tokens kept.
    #[arg(long, default_value_t = 8)]
    pub max_target_length: usize,
    /// Seed for initialisation, data order and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_steps: usize,
    /// Resume from a checkpoint directory (or `latest` in --output-dir).
    #[arg(long)]
    pub resume: Option<String>,
    /// Text column.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Prompt; `{text}` is replaced by the text column.
    #[arg(long, default_value = "Tweet text: {text} Label:")]
    pub prompt_template: String,
    /// Examples shown with their generated label at the end.
    #[arg(long, default_value_t = 5)]
    pub show_examples: usize,
    /// No progress bar (logs one line per epoch).
    #[arg(long)]
    pub quiet: bool,
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    /// First logged training loss.
    pub first_loss: f64,
    /// Last training loss.
    pub last_loss: f64,
    /// Accuracy on the training data, by generation with the reloaded adapter.
    pub train_accuracy: f64,
    /// Accuracy on the evaluation data, by generation with the reloaded adapter.
    pub eval_accuracy: Option<f64>,
    /// The saved adapter directory.
    pub adapter_dir: PathBuf,
}

/// The model `peft train` fine-tunes.
pub type Model<B> = T5ForConditionalGeneration<B>;

/// Forces every lazy parameter to initialise now, in a fixed order, so a seed fixes the weights.
struct Materialize;

impl<B: Backend> ModuleMapper<B> for Materialize {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let _ = param.val();
        param
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Gives every adapter parameter an id derived from its PEFT key, so optimizer state saved in a
/// checkpoint finds its parameters again in a new process.
fn stable_ids<B: Backend, M: AdapterHost<B>>(peft: &mut PeftModel<B, M>) {
    peft.base_model.visit_linears_mut(&mut |path, layer| {
        for a in layer.lora.iter_mut() {
            for (suffix, p) in [("lora_A", &mut a.lora_a), ("lora_B", &mut a.lora_b)] {
                let id = ParamId::from(fnv(&format!("{path}.{suffix}.{}", a.name)));
                *p = Param::initialized(id, p.val());
            }
        }
        for a in layer.ia3.iter_mut() {
            let id = ParamId::from(fnv(&format!("{path}.ia3_l.{}", a.name)));
            a.ia3_l = Param::initialized(id, a.ia3_l.val());
        }
        for c in layer.saved.iter_mut() {
            let id = ParamId::from(fnv(&format!("{path}.modules_to_save.{}.weight", c.name)));
            c.weight = Param::initialized(id, c.weight.val());
            if let Some(b) = c.bias.as_mut() {
                let id = ParamId::from(fnv(&format!("{path}.modules_to_save.{}.bias", c.name)));
                *b = Param::initialized(id, b.val());
            }
        }
    });
    peft.base_model.visit_sublayers_mut(&mut |site, adapters| {
        for a in adapters.adapters.iter_mut() {
            let key =
                |t: &str| ParamId::from(fnv(&format!("{}.adapters.{}.{t}", site.path, a.name)));
            a.down_weight = Param::initialized(key("down.weight"), a.down_weight.val());
            a.down_bias = Param::initialized(key("down.bias"), a.down_bias.val());
            a.up_weight = Param::initialized(key("up.weight"), a.up_weight.val());
            a.up_bias = Param::initialized(key("up.bias"), a.up_bias.val());
            for (n, norm) in [
                ("before", a.norm_before.as_mut()),
                ("after", a.norm_after.as_mut()),
            ] {
                if let Some(norm) = norm {
                    norm.weight =
                        Param::initialized(key(&format!("norm_{n}.weight")), norm.weight.val());
                    norm.bias = Param::initialized(key(&format!("norm_{n}.bias")), norm.bias.val());
                }
            }
            if let Some(s) = a.learned_scaling.as_mut() {
                *s = Param::initialized(key("scaling"), s.val());
            }
        }
    });
}

fn ids<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|v| *v as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

fn labels_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

/// What differs between training tasks: the model, its loss, its predictions, its base.
pub trait Task {
    /// The model, for any backend.
    type Model<BB: Backend>: AdapterHost<BB> + HfParams<BB>;

    /// Mean loss of a batch, the number of counted targets, and the tokens processed.
    fn loss<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        batch: &[&Example],
        device: &BB::Device,
    ) -> Result<(Tensor<BB, 1>, usize, usize)>;

    /// Predicted labels (as text) for `data`.
    fn predict<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        data: &[Example],
        device: &BB::Device,
    ) -> Result<Vec<String>>;

    /// How an example is shown to the model (the prompt), for the end-of-run samples.
    fn render(&self, e: &Example) -> String {
        e.text.clone()
    }

    /// Loads the pretrained base from an HF model directory.
    fn load_base<BB: Backend>(&self, dir: &Path, device: &BB::Device) -> Result<Self::Model<BB>>;

    /// Mean loss over `data` (target-weighted) and accuracy of the predictions.
    fn evaluate<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        data: &[Example],
        batch_size: usize,
        device: &BB::Device,
    ) -> Result<(f64, f64)> {
        let mut total = 0.0;
        let mut count = 0usize;
        let mut correct = 0usize;
        for chunk in data.chunks(batch_size.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (loss, n, _) = self.loss(model, &refs, device)?;
            total += loss.into_scalar().elem::<f64>() * n as f64;
            count += n;
            let preds = self.predict(model, chunk, device)?;
            correct += preds
                .iter()
                .zip(chunk)
                .filter(|(p, e)| p.trim() == e.label.trim())
                .count();
        }
        Ok((
            total / count.max(1) as f64,
            correct as f64 / data.len().max(1) as f64,
        ))
    }
}

/// Seq2seq LM (`SEQ_2_SEQ_LM`): the label is generated as text.
pub struct Seq2SeqTask<'a> {
    args: &'a TrainArgs,
    tok: &'a TextTokenizer,
    pad: u32,
    start: u32,
}

impl Task for Seq2SeqTask<'_> {
    type Model<BB: Backend> = T5ForConditionalGeneration<BB>;

    fn render(&self, e: &Example) -> String {
        apply_template(&self.args.prompt_template, &e.text)
    }

    fn loss<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        batch: &[&Example],
        device: &BB::Device,
    ) -> Result<(Tensor<BB, 1>, usize, usize)> {
        let b = seq2seq_batch(
            self.tok,
            batch,
            &self.args.prompt_template,
            self.args.max_source_length,
            self.args.max_target_length,
            self.pad,
            self.start,
        )?;
        let enc = model.encode(
            ids::<BB>(&b.input_ids, device),
            Some(ids::<BB>(&b.attention_mask, device)),
        );
        let logits = model.decode(
            ids::<BB>(&b.decoder_input_ids, device),
            enc,
            Some(ids::<BB>(&b.attention_mask, device)),
            None,
        );
        let (loss, n) = masked_cross_entropy(logits, labels_tensor::<BB>(&b.labels, device));
        Ok((loss, n, b.tokens))
    }

    fn predict<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        data: &[Example],
        device: &BB::Device,
    ) -> Result<Vec<String>> {
        let prompts: Vec<String> = data
            .iter()
            .map(|e| apply_template(&self.args.prompt_template, &e.text))
            .collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let batch = self
            .tok
            .encode_batch(&refs, Some(self.args.max_source_length), self.pad)?;
        let out = model.generate_greedy(
            ids::<BB>(&batch.ids, device),
            Some(ids::<BB>(&batch.mask, device)),
            self.args.max_target_length,
        );
        out.iter()
            .map(|r| {
                let r: Vec<u32> = r.iter().map(|v| *v as u32).collect();
                Ok(self.tok.decode(&r)?)
            })
            .collect()
    }

    fn load_base<BB: Backend>(&self, dir: &Path, device: &BB::Device) -> Result<Self::Model<BB>> {
        let (model, report) = peft_io::load_t5::<BB>(dir, device)?;
        if !report.unused.is_empty() {
            eprintln!(
                "warning: unused tensors in {}: {:?}",
                dir.display(),
                report.unused
            );
        }
        Ok(model)
    }
}

/// Sequence classification (`SEQ_CLS`): a BERT encoder, LoRA on its attention, the classifier
/// head trained in full as PEFT's `modules_to_save`; labels are the distinct label strings of
/// the training data, in sorted order.
pub struct ClsTask<'a> {
    args: &'a TrainArgs,
    tok: &'a TextTokenizer,
    pad: u32,
    labels: Vec<String>,
}

impl Task for ClsTask<'_> {
    type Model<BB: Backend> = BertForSequenceClassification<BB>;

    fn loss<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        batch: &[&Example],
        device: &BB::Device,
    ) -> Result<(Tensor<BB, 1>, usize, usize)> {
        let texts: Vec<&str> = batch.iter().map(|e| e.text.as_str()).collect();
        let enc = self
            .tok
            .encode_batch(&texts, Some(self.args.max_source_length), self.pad)?;
        let tokens = enc.mask.iter().flatten().map(|m| *m as usize).sum();
        let targets: Vec<i64> = batch
            .iter()
            .map(|e| {
                self.labels
                    .iter()
                    .position(|l| *l == e.label)
                    .map_or(-100, |i| i as i64)
            })
            .collect();
        let (logits, _) = model.forward(
            ids::<BB>(&enc.ids, device),
            Some(ids::<BB>(&enc.mask, device)),
            None,
        );
        let [b, c] = logits.dims();
        let (loss, n) = masked_cross_entropy(
            logits.reshape([b, 1, c]),
            labels_tensor::<BB>(&[targets], device).reshape([b, 1]),
        );
        Ok((loss, n, tokens))
    }

    fn predict<BB: Backend>(
        &self,
        model: &Self::Model<BB>,
        data: &[Example],
        device: &BB::Device,
    ) -> Result<Vec<String>> {
        let texts: Vec<&str> = data.iter().map(|e| e.text.as_str()).collect();
        let enc = self
            .tok
            .encode_batch(&texts, Some(self.args.max_source_length), self.pad)?;
        let (logits, _) = model.forward(
            ids::<BB>(&enc.ids, device),
            Some(ids::<BB>(&enc.mask, device)),
            None,
        );
        let best = logits.argmax(1).into_data().convert::<i64>();
        let best: Vec<i64> = best.to_vec().expect("argmax ids");
        Ok(best
            .into_iter()
            .map(|i| self.labels[i as usize].clone())
            .collect())
    }

    fn load_base<BB: Backend>(&self, dir: &Path, device: &BB::Device) -> Result<Self::Model<BB>> {
        let config = peft_io::hf_model::read_bert_config(dir)?;
        let mut config = config;
        config.num_labels = Some(self.labels.len());
        config.id2label = None;
        let mut model = BertForSequenceClassification::new(&config, device)?;
        let source = peft_io::open_weights(dir)?;
        let report = peft_io::load_hf_weights(&mut model, &source)?;
        if !report.newly_initialized.is_empty() {
            eprintln!(
                "note: new head, initialised from the seed: {:?}",
                report.newly_initialized
            );
        }
        Ok(model)
    }
}

struct Checkpointer<'a> {
    out: &'a Path,
}

impl Checkpointer<'_> {
    fn save<B: AutodiffBackend, M: AdapterHost<B> + AutodiffModule<B>, O: Optimizer<M, B>>(
        &self,
        peft: &PeftModel<B, M>,
        optim: &O,
        state: serde_json::Value,
        step: usize,
    ) -> Result<PathBuf> {
        let dir = self.out.join(format!("checkpoint-{step}"));
        peft_io::save_pretrained(peft, &dir)?;
        peft_io::checkpoint::save_record::<B, _>(optim.to_record(), &dir.join("optimizer.mpk"))?;
        peft_io::tensors::write_atomic(
            &dir.join("trainer_state.json"),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        std::fs::write(self.out.join("latest"), format!("checkpoint-{step}"))
            .context("writing latest")?;
        Ok(dir)
    }
}

fn human(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// A finished run: its summary and the trained model (base frozen, adapter attached).
pub struct TrainOutcome<B: AutodiffBackend, M: AdapterHost<B>> {
    /// Numbers.
    pub summary: TrainSummary,
    /// The model as trained.
    pub model: PeftModel<B, M>,
}

/// Runs the training described by `args` on backend `B` (autodiff) at `device`: seq2seq LM, or
/// sequence classification with `--task-type SEQ_CLS`.
pub fn train<B: AutodiffBackend>(args: &TrainArgs, device: &B::Device) -> Result<TrainSummary> {
    let task = args.lora.task()?.unwrap_or(TaskType::Seq2SeqLm);
    match task {
        TaskType::Seq2SeqLm => Ok(train_seq2seq::<B>(args, device)?.summary),
        TaskType::SeqCls => Ok(train_seq_cls::<B>(args, device)?.summary),
        other => bail!("task {other:?} is not supported by `peft train` (SEQ_2_SEQ_LM, SEQ_CLS)"),
    }
}

fn read_data(args: &TrainArgs) -> Result<(Vec<Example>, Option<Vec<Example>>)> {
    let train_data = read_examples(&args.data, &args.text_column, &args.label_column)?;
    let eval_data = match &args.eval_data {
        Some(p) => Some(read_examples(p, &args.text_column, &args.label_column)?),
        None => None,
    };
    Ok((train_data, eval_data))
}

/// Seq2seq LoRA training (the seed's workflow) on a T5-family model.
pub fn train_seq2seq<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
) -> Result<TrainOutcome<B, Model<B>>> {
    let out = &args.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tok_path = match (&args.tokenizer, T5Config::preset_by_name(&args.model)) {
        (Some(t), _) => t.clone(),
        (None, None) => PathBuf::from(&args.model).join("tokenizer.json"),
        (None, Some(_)) => bail!("--model {} is a preset: give its --tokenizer", args.model),
    };
    let tok = TextTokenizer::from_path(&tok_path)?;
    let (base, base_dir) = if let Some(mut config) = T5Config::preset_by_name(&args.model) {
        // A preset gives the architecture; the weights are random from the seed and the
        // vocabulary is the tokenizer's. The base is saved as an HF model dir so that Python
        // (and the reload below) can load base + adapter.
        config.vocab_size = tok.inner().get_vocab_size(true);
        B::seed(device, args.seed);
        let base = T5ForConditionalGeneration::<B>::new(&config, device)?.map(&mut Materialize);
        let d = out.join("base_model");
        let mut m = base.clone();
        peft_io::save_hf_model(&mut m, &config.to_hf_json(), &d, None)?;
        std::fs::copy(&tok_path, d.join("tokenizer.json")).context("copying tokenizer.json")?;
        (base, d)
    } else {
        let dir = PathBuf::from(&args.model);
        let (base, report) = peft_io::load_t5::<B>(&dir, device)?;
        if !report.unused.is_empty() {
            eprintln!(
                "warning: unused tensors in {}: {:?}",
                dir.display(),
                report.unused
            );
        }
        (base, dir)
    };
    let task = Seq2SeqTask {
        args,
        tok: &tok,
        pad: base.config.pad_token_id.unwrap_or(0) as u32,
        start: base.config.decoder_start() as u32,
    };
    let (train_data, eval_data) = read_data(args)?;
    run(
        &task, args, base, &base_dir, &tok_path, train_data, eval_data, device,
    )
}

/// Sequence-classification LoRA training on a BERT-family model (an HF dir, e.g. MiniLM): LoRA
/// on the targets (default query, value), the classifier trained in full (`modules_to_save`).
pub fn train_seq_cls<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
) -> Result<TrainOutcome<B, BertForSequenceClassification<B>>> {
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let dir = PathBuf::from(&args.model);
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tok = TextTokenizer::from_path(&tok_path)?;
    let (train_data, eval_data) = read_data(args)?;
    let mut labels: Vec<String> = train_data.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    let task = ClsTask {
        args,
        tok: &tok,
        pad: tok.token_id("[PAD]").unwrap_or(0),
        labels,
    };
    // The new classifier head is drawn from the seed.
    B::seed(device, args.seed);
    let base = task.load_base::<B>(&dir, device)?.map(&mut Materialize);
    run(
        &task, args, base, &dir, &tok_path, train_data, eval_data, device,
    )
}

/// The training loop shared by every task.
#[allow(clippy::too_many_arguments)]
fn run<B, T>(
    task: &T,
    args: &TrainArgs,
    base: T::Model<B>,
    base_dir: &Path,
    tok_path: &Path,
    train_data: Vec<Example>,
    eval_data: Option<Vec<Example>>,
    device: &B::Device,
) -> Result<TrainOutcome<B, T::Model<B>>>
where
    B: AutodiffBackend,
    T: Task,
    T::Model<B>: AutodiffModule<B, InnerModule = T::Model<B::InnerBackend>>,
{
    let out = &args.output_dir;
    let mut config = args.lora.adapter_config()?;
    let base_name = Some(base_dir.display().to_string());
    match &mut config {
        AdapterConfig::Lora(c) => {
            c.task_type = Some(c.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.base_model_name_or_path = base_name;
        }
        AdapterConfig::Ia3(c) => {
            c.task_type = Some(c.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.base_model_name_or_path = base_name;
        }
        AdapterConfig::Bottleneck(_) => {
            if args.lora.task()? == Some(TaskType::SeqCls) {
                bail!(
                    "--method {} with SEQ_CLS: training a classification head next to a \
                     bottleneck adapter is not implemented yet (use --method lora or ia3, whose \
                     `modules_to_save` train the head)",
                    args.lora.method
                );
            }
        }
    }
    let mut peft = PeftModel::new(base, config, "default")?;
    stable_ids(&mut peft);
    println!("{}", peft.trainable_parameters_line());

    let micro_per_epoch = train_data.len().div_ceil(args.batch_size.max(1));
    let accum = args.gradient_accumulation_steps.max(1);
    let steps_per_epoch = (micro_per_epoch / accum).max(1);
    let total_steps = args.max_steps.unwrap_or(steps_per_epoch * args.epochs);
    let epochs = total_steps.div_ceil(steps_per_epoch);
    let schedule = LinearSchedule {
        lr: args.learning_rate,
        warmup: args.warmup_steps,
        total: total_steps,
    };
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(args.weight_decay as f32)
        .init::<B, T::Model<B>>();

    let mut step = 0usize;
    if let Some(r) = &args.resume {
        let dir = if r == "latest" {
            let name = std::fs::read_to_string(out.join("latest"))
                .with_context(|| format!("no checkpoint recorded in {}", out.display()))?;
            out.join(name.trim())
        } else {
            PathBuf::from(r)
        };
        let state = peft_io::hf_model::read_json(&dir.join("trainer_state.json"))?;
        step = state["global_step"]
            .as_u64()
            .context("trainer_state.json: global_step")? as usize;
        peft_io::adapter::load_adapter_weights(&mut peft, &dir, "default")?;
        peft.set_adapter(&["default"])?;
        let record = peft_io::checkpoint::load_record::<B, _>(&dir.join("optimizer.mpk"), device)?;
        optim = optim.load_record(record);
        eprintln!("resumed from {} at step {step}", dir.display());
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C (or a failure to install the handler) falls back to the default.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }

    let ckpt = Checkpointer { out };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .context("opening metrics.jsonl")?;
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut losses: Vec<(usize, f64)> = Vec::new();
    let run_start = Instant::now();
    let start_step = step;
    let state = |step: usize, epoch: usize| json!({"global_step": step, "epoch": epoch, "seed": args.seed, "total_steps": total_steps});

    'epochs: for epoch in 0..epochs {
        let order = SplitMix(args.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9))
            .permutation(train_data.len());
        let batches: Vec<Vec<&Example>> = order
            .chunks(args.batch_size.max(1))
            .map(|c| c.iter().map(|i| &train_data[*i]).collect())
            .collect();
        for s in 0..steps_per_epoch {
            let global = epoch * steps_per_epoch + s;
            if global < step {
                continue; // resumed: already done
            }
            if step >= total_steps {
                break 'epochs;
            }
            let t0 = Instant::now();
            let mut acc = GradientsAccumulator::<T::Model<B>>::new();
            let mut loss_sum = 0.0;
            let mut tokens = 0usize;
            for m in 0..accum {
                let micro = s * accum + m;
                let Some(batch) = batches.get(micro) else {
                    break;
                };
                // Dropout randomness is a function of (seed, micro-step): resumable.
                let micro_seed = args
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((global * accum + m) as u64);
                B::seed(device, micro_seed);
                peft_core::dropout::seed(micro_seed);
                let (loss, _, ntok) = task.loss(&peft.base_model, batch, device)?;
                tokens += ntok;
                let value = loss.clone().into_scalar().elem::<f64>();
                if !value.is_finite() {
                    bail!(
                        "loss became {value} at step {step} (epoch {epoch}); nothing was saved for this step. \
                         Lower --learning-rate or check the data; the last checkpoint (if any) is in {}",
                        out.display()
                    );
                }
                loss_sum += value / accum as f64;
                let grads = (loss / accum as f64).backward();
                let grads = GradientsParams::from_grads(grads, &peft.base_model);
                acc.accumulate(&peft.base_model, grads);
            }
            let mut grads = acc.grads();
            let grad_norm = if args.max_grad_norm > 0.0 {
                clip_grad_norm(&peft.base_model, &mut grads, args.max_grad_norm)
            } else {
                f64::NAN
            };
            let lr = schedule.lr_at(step);
            peft.base_model = optim.step(lr, peft.base_model, grads);
            step += 1;
            first_loss.get_or_insert(loss_sum);
            last_loss = loss_sum;
            losses.push((step, loss_sum));
            let dt = t0.elapsed().as_secs_f64();
            let tps = tokens as f64 / dt.max(1e-9);
            writeln!(
                metrics,
                "{}",
                json!({"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps})
            )?;
            if !args.quiet {
                let done = step - start_step;
                let eta =
                    run_start.elapsed().as_secs_f64() / done as f64 * (total_steps - step) as f64;
                let width = 24;
                let filled = width * step / total_steps.max(1);
                eprint!(
                    "\r[{}{}] step {step}/{total_steps} epoch {} loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s ETA {}   ",
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    epoch + 1,
                    human(eta)
                );
            }
            if args.save_steps > 0 && step.is_multiple_of(args.save_steps) {
                ckpt.save(&peft, &optim, state(step, epoch), step)?;
            }
            if stop.load(Ordering::SeqCst) {
                let dir = ckpt.save(&peft, &optim, state(step, epoch), step)?;
                eprintln!(
                    "\ninterrupted: checkpoint saved to {} (resume with --resume latest)",
                    dir.display()
                );
                std::process::exit(130);
            }
        }
        if !args.quiet {
            eprintln!();
        }
        if let Some(eval) = &eval_data {
            let model = peft.base_model.valid();
            let (eval_loss, eval_acc) = task.evaluate(&model, eval, args.batch_size, device)?;
            println!(
                "epoch {}: train loss {last_loss:.4}, eval loss {eval_loss:.4}, eval accuracy {:.1}%",
                epoch + 1,
                100.0 * eval_acc
            );
            writeln!(
                metrics,
                "{}",
                json!({"step": step, "epoch": epoch + 1, "eval_loss": eval_loss, "eval_accuracy": eval_acc})
            )?;
        }
    }

    // The output directory is exactly what Python PEFT loads.
    peft_io::save_pretrained(&peft, out)?;
    std::fs::copy(tok_path, out.join("tokenizer.json")).context("copying tokenizer.json")?;
    if !losses.is_empty() {
        crate::plot::loss_curve_png(&losses, &out.join("loss.png"))?;
    }
    println!("saved adapter to {}", out.display());

    // Reload from disk, as a user would, and predict.
    let inner_device = device.clone();
    let base = task.load_base::<B::InnerBackend>(base_dir, &inner_device)?;
    let (reloaded, _) = peft_io::from_pretrained(base, out, "default")?;
    let model = &reloaded.base_model;
    let show: Vec<Example> = eval_data
        .as_ref()
        .unwrap_or(&train_data)
        .iter()
        .take(args.show_examples)
        .cloned()
        .collect();
    if !show.is_empty() {
        let preds = task.predict(model, &show, &inner_device)?;
        for (e, p) in show.iter().zip(&preds) {
            println!("  {:?} -> {p:?} (label {:?})", task.render(e), e.label);
        }
    }
    let (_, train_acc) = task.evaluate(model, &train_data, args.batch_size, &inner_device)?;
    let eval_acc = match &eval_data {
        Some(e) => Some(task.evaluate(model, e, args.batch_size, &inner_device)?.1),
        None => None,
    };
    let majority = |d: &[Example]| {
        let mut counts = std::collections::HashMap::new();
        for e in d {
            *counts.entry(e.label.as_str()).or_insert(0usize) += 1;
        }
        100.0 * counts.values().copied().max().unwrap_or(0) as f64 / d.len().max(1) as f64
    };
    println!(
        "reloaded adapter: train accuracy {:.1}% (majority class {:.1}%)",
        100.0 * train_acc,
        majority(&train_data)
    );
    if let (Some(acc), Some(e)) = (eval_acc, &eval_data) {
        println!(
            "reloaded adapter: test accuracy {:.1}% (majority class {:.1}%)",
            100.0 * acc,
            majority(e)
        );
    }
    let summary = TrainSummary {
        steps: step,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        train_accuracy: train_acc,
        eval_accuracy: eval_acc,
        adapter_dir: out.clone(),
    };
    Ok(TrainOutcome {
        summary,
        model: peft,
    })
}
