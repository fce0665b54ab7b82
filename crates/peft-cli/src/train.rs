//! `peft train`: maps the command line onto `peft_train` (HF `TrainingArguments`, a task, the
//! trainer), renders progress, and after training reloads the saved adapter from disk and
//! reports its accuracy, as a user would check it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::Args;
use peft_core::{AdapterConfig, AdapterHost, PeftModel, TaskType};
use peft_io::TextTokenizer;
use peft_models::{BertForSequenceClassification, T5Config, T5ForConditionalGeneration};
use peft_train::checkpoint::OutputDirLock;
use peft_train::{
    CancellationToken, Control, EvalStrategy, Example, Seq2SeqLmTask, SeqClsTask, Task, Trainer,
    TrainerEvent, TrainingArgs, read_examples,
};

use crate::AdapterArgs;

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
    pub lora: AdapterArgs,
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
    /// Data-parallel on this machine: N worker processes (one per device), each taking
    /// --batch-size examples of every global batch of N x --batch-size.
    #[arg(long, default_value_t = 1, conflicts_with = "world_size")]
    pub nproc: usize,
    /// Data-parallel across machines: the number of workers in all, one process each, started
    /// by any launcher (ssh, Slurm, Kubernetes) with the same flags and its own --rank.
    #[arg(long, requires = "rank", requires = "coordinator")]
    pub world_size: Option<usize>,
    /// This worker's rank, 0..--world-size; rank 0 runs the coordinator and alone writes
    /// --output-dir.
    #[arg(long, requires = "world_size")]
    pub rank: Option<usize>,
    /// HOST:PORT where rank 0 meets the others, the same for every worker (each worker then
    /// serves its tensors on a free port of its own).
    #[arg(long, requires = "world_size")]
    pub coordinator: Option<String>,
    /// The address other workers reach this one at (default: this machine's address on the
    /// route to the coordinator).
    #[arg(long)]
    pub node_host: Option<String>,
    /// The GPU (CUDA/wgpu index) this worker trains on: default its rank under --nproc, else 0.
    #[arg(long)]
    pub local_rank: Option<usize>,
    /// Seconds a worker waits for the others, to join and inside one gradient all-reduce.
    #[arg(long, default_value_t = 600)]
    pub collective_timeout: u64,
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps taken (in all, including those before a resume).
    pub steps: usize,
    /// First training loss logged by this process.
    pub first_loss: f64,
    /// Last training loss logged by this process.
    pub last_loss: f64,
    /// Accuracy on the training data, by prediction with the reloaded adapter.
    pub train_accuracy: f64,
    /// Accuracy on the evaluation data, by prediction with the reloaded adapter.
    pub eval_accuracy: Option<f64>,
    /// The saved adapter directory.
    pub adapter_dir: PathBuf,
    /// Stopped by Ctrl-C: a checkpoint was saved, the adapter was not.
    pub interrupted: bool,
    /// The checkpoint was already at the last step: nothing was trained or written.
    pub nothing_to_train: bool,
}

/// The model `peft train` fine-tunes by default.
pub type Model<B> = T5ForConditionalGeneration<B>;

/// Forces every lazy parameter to initialise now, in a fixed order, so a seed fixes the weights.
struct Materialize;

impl<B: Backend> ModuleMapper<B> for Materialize {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let _ = param.val();
        param
    }
}

/// A finished run: its summary and the trained model (base frozen, adapter attached).
pub struct TrainOutcome<B: AutodiffBackend, M: AdapterHost<B>> {
    /// Numbers.
    pub summary: TrainSummary,
    /// The model as trained.
    pub model: PeftModel<B, M>,
}

impl TrainArgs {
    /// The `TrainingArguments` these flags give.
    pub fn training_args(&self) -> TrainingArgs {
        TrainingArgs {
            output_dir: self.output_dir.clone(),
            num_train_epochs: self.epochs,
            max_steps: self.max_steps,
            per_device_train_batch_size: self.batch_size,
            per_device_eval_batch_size: self.batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            warmup_steps: self.warmup_steps,
            seed: self.seed,
            save_steps: (self.save_steps > 0).then_some(self.save_steps),
            eval_strategy: if self.eval_data.is_some() {
                EvalStrategy::Epoch
            } else {
                EvalStrategy::No
            },
            resume_from_checkpoint: self.resume.clone(),
            ..TrainingArgs::default()
        }
    }

    /// The data-parallel group these flags describe (`None` for one process).
    pub fn world(&self) -> Result<Option<peft_train::distributed::WorldConfig>> {
        let (Some(world), Some(rank), Some(coord)) =
            (self.world_size, self.rank, &self.coordinator)
        else {
            return Ok(None);
        };
        if world == 0 {
            bail!("--world-size must be at least 1, found 0");
        }
        if rank >= world {
            bail!("--rank must be below --world-size {world}, found {rank}");
        }
        let mut w = peft_train::distributed::WorldConfig::new(world, rank, coord.clone())
            .with_timeout(std::time::Duration::from_secs(
                self.collective_timeout.max(1),
            ));
        if let Some(h) = &self.node_host {
            w = w.with_node_host(h.clone());
        }
        Ok(Some(w))
    }

    /// This process's rank (0 outside data parallelism).
    pub fn rank(&self) -> usize {
        self.rank.unwrap_or(0)
    }

    /// Refuses flags no run can use, naming the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--max-source-length", self.max_source_length),
            ("--max-target-length", self.max_target_length),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1, found 0");
            }
        }
        self.training_args().validate().map_err(|e| match e {
            peft_train::TrainError::InvalidArgument { name, message } => {
                let flag = match name {
                    "num_train_epochs" => "--epochs",
                    "per_device_train_batch_size" | "per_device_eval_batch_size" => "--batch-size",
                    "gradient_accumulation_steps" => "--gradient-accumulation-steps",
                    "max_steps" => "--max-steps",
                    "save_steps" => "--save-steps",
                    "learning_rate" => "--learning-rate",
                    "weight_decay" => "--weight-decay",
                    "max_grad_norm" => "--max-grad-norm",
                    other => other,
                };
                anyhow::anyhow!("{flag}: {message}")
            }
            other => other.into(),
        })
    }
}

/// Runs the training described by `args` on backend `B` (autodiff) at `device`: seq2seq LM, or
/// sequence classification with `--task-type SEQ_CLS`. `cancel` stops it (Ctrl-C in `peft`).
pub fn train<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
    cancel: CancellationToken,
) -> Result<TrainSummary> {
    let task = args.lora.task()?.unwrap_or(TaskType::Seq2SeqLm);
    let mut group = match args.world()? {
        Some(w) => Some(peft_train::distributed::WorkerGroup::join(&w)?),
        None => None,
    };
    let result = match task {
        TaskType::Seq2SeqLm => {
            train_seq2seq_with::<B>(args, device, cancel, group.as_mut()).map(|o| o.summary)
        }
        TaskType::SeqCls => {
            train_seq_cls_with::<B>(args, device, cancel, group.as_mut()).map(|o| o.summary)
        }
        other => Err(anyhow::anyhow!(
            "task {other:?} is not supported by `peft train` (SEQ_2_SEQ_LM, SEQ_CLS)"
        )),
    };
    // The others learn why this worker stops (the trainer has told them already if it failed).
    if let (Some(g), Err(e)) = (group.as_mut(), &result) {
        peft_train::distributed::Collective::abort(g, &format!("{e:#}"));
    }
    result
}

type Group<'g> = Option<&'g mut peft_train::distributed::WorkerGroup>;

fn read_data(args: &TrainArgs) -> Result<(Vec<Example>, Option<Vec<Example>>)> {
    let train_data = read_examples(&args.data, &args.text_column, &args.label_column)?;
    let eval_data = match &args.eval_data {
        Some(p) => Some(read_examples(p, &args.text_column, &args.label_column)?),
        None => None,
    };
    Ok((train_data, eval_data))
}

/// Seq2seq adapter training on a T5-family model (mt0-style LoRA fine-tuning).
pub fn train_seq2seq<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
) -> Result<TrainOutcome<B, Model<B>>> {
    train_seq2seq_with(args, device, CancellationToken::new(), None)
}

/// Rank 0 (or a run of one process) locks the output directory before writing anything into
/// it; the other workers of a data-parallel run never write there.
fn lock_output(args: &TrainArgs) -> Result<Option<OutputDirLock>> {
    if args.rank() != 0 {
        return Ok(None);
    }
    let out = &args.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(Some(OutputDirLock::acquire(out)?))
}

fn train_seq2seq_with<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
    cancel: CancellationToken,
    group: Group<'_>,
) -> Result<TrainOutcome<B, Model<B>>> {
    args.validate()?;
    let out = &args.output_dir;
    // Locked before anything is written into it (the preset's base model below).
    let lock = lock_output(args)?;
    let tok_path = match (&args.tokenizer, T5Config::preset_by_name(&args.model)) {
        (Some(t), _) => t.clone(),
        (None, None) => PathBuf::from(&args.model).join("tokenizer.json"),
        (None, Some(_)) => bail!("--model {} is a preset: give its --tokenizer", args.model),
    };
    let tok = TextTokenizer::from_path(&tok_path)?;
    let (train_data, eval_data) = read_data(args)?;
    let (base, base_dir) = if let Some(mut config) = T5Config::preset_by_name(&args.model) {
        // A preset gives the architecture; the weights are random from the seed and the
        // vocabulary is the tokenizer's. The base is saved as an HF model dir so that Python
        // (and the reload below) can load base + adapter.
        config.vocab_size = tok.inner().get_vocab_size(true);
        B::seed(device, args.seed);
        let base = T5ForConditionalGeneration::<B>::new(&config, device)?.map(&mut Materialize);
        let d = out.join("base_model");
        if lock.is_some() {
            let mut m = base.clone();
            peft_io::save_hf_model(&mut m, &config.to_hf_json(), &d, None)?;
            std::fs::copy(&tok_path, d.join("tokenizer.json")).context("copying tokenizer.json")?;
        }
        (base, d)
    } else {
        let dir = PathBuf::from(&args.model);
        (load_t5_warn::<B>(&dir, device)?, dir)
    };
    crate::ensure_memory(
        base.config.activation_bytes(
            args.batch_size,
            args.max_source_length,
            args.max_target_length,
            true,
        ),
        &format!(
            "a training batch of {} x {} source tokens (activations kept for the backward pass)",
            args.batch_size, args.max_source_length
        ),
        "lower --batch-size or --max-source-length",
    )?;
    let task = Seq2SeqLmTask::new(&tok, &base)
        .with_prompt_template(args.prompt_template.clone())
        .with_max_lengths(args.max_source_length, args.max_target_length);
    let reload = |dir: &Path, d: &B::Device| load_t5_warn(dir, d);
    run(
        &task, args, base, &base_dir, &tok_path, train_data, eval_data, device, cancel, reload,
        lock, group,
    )
}

fn load_t5_warn<BB: Backend>(dir: &Path, device: &BB::Device) -> Result<Model<BB>> {
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

/// Sequence-classification LoRA training on a BERT-family model (an HF dir, e.g. MiniLM): LoRA
/// on the targets (default query, value), the classifier trained in full (`modules_to_save`).
pub fn train_seq_cls<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
) -> Result<TrainOutcome<B, BertForSequenceClassification<B>>> {
    train_seq_cls_with(args, device, CancellationToken::new(), None)
}

fn train_seq_cls_with<B: AutodiffBackend>(
    args: &TrainArgs,
    device: &B::Device,
    cancel: CancellationToken,
    group: Group<'_>,
) -> Result<TrainOutcome<B, BertForSequenceClassification<B>>> {
    args.validate()?;
    let lock = lock_output(args)?;
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
    let task = SeqClsTask::new(&tok, labels).with_max_length(args.max_source_length);
    // The new classifier head is drawn from the seed.
    B::seed(device, args.seed);
    let (base, new) = task.load_base::<B>(&dir, device)?;
    if !new.is_empty() && args.rank() == 0 {
        eprintln!("note: new head, initialised from the seed: {new:?}");
    }
    // Virtual tokens take BERT positions too: the longest input plus them must have one each.
    let virtual_tokens = args
        .lora
        .adapter_config()?
        .prompt_common()
        .map_or(0, |c| c.num_virtual_tokens);
    let positions = base.bert.config.max_position_embeddings;
    if virtual_tokens > 0 && args.max_source_length + virtual_tokens > positions {
        bail!(
            "--max-source-length {} plus --num-virtual-tokens {virtual_tokens} exceeds the \
             model's {positions} positions (max_position_embeddings in {}); lower one of them",
            args.max_source_length,
            dir.join("config.json").display()
        );
    }
    crate::ensure_memory(
        base.bert.config.activation_bytes(
            args.batch_size,
            args.max_source_length
                .min(base.bert.config.max_position_embeddings),
            true,
        ),
        &format!(
            "a training batch of {} x {} tokens (activations kept for the backward pass)",
            args.batch_size, args.max_source_length
        ),
        "lower --batch-size or --max-source-length",
    )?;
    let base = base.map(&mut Materialize);
    let reload = |d: &Path, dev: &B::Device| Ok(task.load_base::<B::InnerBackend>(d, dev)?.0);
    run(
        &task, args, base, &dir, &tok_path, train_data, eval_data, device, cancel, reload, lock,
        group,
    )
}

fn human(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Prints the trainer's events: a progress bar on stderr (unless `quiet`), one line per
/// evaluation and the trainable-parameter line on stdout.
fn progress(quiet: bool) -> impl FnMut(&TrainerEvent<'_>) -> Control {
    move |event| {
        match event {
            TrainerEvent::Begin { trainable, .. } => println!("{trainable}"),
            TrainerEvent::Resumed { checkpoint, step } => {
                eprintln!("resumed from {} at step {step}", checkpoint.display())
            }
            TrainerEvent::ResumeFallback { reason, checkpoint } => eprintln!(
                "warning: {reason}; resuming from the newest complete checkpoint, {}",
                checkpoint.display()
            ),
            TrainerEvent::CleanedUp(paths) => eprintln!(
                "removed {} temporary file(s) left by an interrupted run",
                paths.len()
            ),
            TrainerEvent::Step(s) if !quiet => {
                let eta =
                    s.elapsed_s / s.steps_this_run.max(1) as f64 * (s.total_steps - s.step) as f64;
                let width = 24;
                let filled = width * s.step / s.total_steps.max(1);
                eprint!(
                    "\r[{}{}] step {}/{} epoch {} loss {:.4} lr {:.2e} {:.0} tok/s ETA {}   ",
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    s.step,
                    s.total_steps,
                    s.epoch + 1,
                    s.loss,
                    s.learning_rate,
                    s.tokens_per_s,
                    human(eta)
                );
                let _ = std::io::stderr().flush();
            }
            TrainerEvent::EpochEnd { .. } if !quiet => eprintln!(),
            TrainerEvent::Evaluated { epoch, eval, .. } => println!(
                "epoch {epoch}: eval loss {:.4}, eval accuracy {:.1}%",
                eval.loss,
                100.0 * eval.accuracy
            ),
            _ => {}
        }
        Control::Continue
    }
}

/// Prompt tuning's TEXT init (the word embeddings of the text's tokens, special tokens
/// included, as PEFT's tokenizer call gives them) and SAMPLE_VOCAB init (of seeded random
/// vocabulary ids; PEFT draws them from torch's RNG).
fn prompt_init<B: burn::tensor::backend::Backend, M: peft_core::AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    c: &peft_core::PromptTuningConfig,
    tok_path: &Path,
    seed: u64,
) -> Result<()> {
    use peft_core::prompt::PromptTuningInit;
    let ids: Vec<usize> = match c.prompt_tuning_init {
        PromptTuningInit::Random => return Ok(()),
        PromptTuningInit::Text => {
            let text = c
                .prompt_tuning_init_text
                .as_deref()
                .context("--prompt-tuning-init TEXT needs --prompt-tuning-init-text")?;
            let tok = TextTokenizer::from_path(tok_path)?;
            tok.encode(text, None)?
                .into_iter()
                .map(|t| t as usize)
                .collect()
        }
        PromptTuningInit::SampleVocab => {
            let vocab = peft
                .base_model
                .word_embeddings()
                .map_or(0, |w| w.dims()[0])
                .max(1);
            let mut rng = peft_core::train::SplitMix(seed ^ 0x5A4D_504C_455F_564F);
            (0..c.common.rows())
                .map(|_| (rng.next_u64() % vocab as u64) as usize)
                .collect()
        }
    };
    peft_core::prompt::model::init_from_token_ids(peft, "default", &ids)?;
    Ok(())
}

/// Trains with the trainer, then writes what the CLI adds to the output directory
/// (`tokenizer.json`, `loss.png`) and checks the saved adapter by reloading it from disk.
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
    cancel: CancellationToken,
    reload: impl Fn(&Path, &B::Device) -> Result<T::Model<B::InnerBackend>>,
    lock: Option<OutputDirLock>,
    group: Group<'_>,
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
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
        }
        AdapterConfig::Ia3(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
        }
        AdapterConfig::LoHa(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
        }
        AdapterConfig::LoKr(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
        }
        AdapterConfig::PromptTuning(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
            if c.prompt_tuning_init == peft_core::prompt::PromptTuningInit::Text {
                c.tokenizer_name_or_path = Some(tok_path.display().to_string());
            }
        }
        AdapterConfig::PTuning(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
        }
        AdapterConfig::PrefixTuning(c) => {
            c.header.task_type = Some(c.header.task_type.unwrap_or(TaskType::Seq2SeqLm));
            c.header.base_model_name_or_path = base_name;
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
    // The adapter's initial weights are drawn from the seed (HF's `set_seed` before
    // `get_peft_model`): runs repeat, and data-parallel workers start from the same adapter.
    B::seed(device, args.seed.wrapping_add(1));
    let init = match &config {
        AdapterConfig::PromptTuning(c) => Some(c.clone()),
        _ => None,
    };
    // PiSSA and OLoRA move part of the base into the adapter: their start is kept, so that the
    // adapter can be saved as a plain LoRA of the unchanged base at the end.
    let mutating = match &config {
        AdapterConfig::Lora(c) => {
            peft_core::methods::lora::init::WeightInit::parse(&c.init_lora_weights)?
                .is_some_and(|w| w.mutates_base())
        }
        _ => false,
    };
    let mut peft = PeftModel::new(base, config, "default")?;
    // Parameters are lazy until here: an absurd size is refused before anything is allocated.
    check_memory(&peft.parameter_counts())?;
    if let Some(c) = init {
        prompt_init(&mut peft, &c, tok_path, args.seed)?;
    }
    let initial = mutating.then(|| peft_io::adapter::adapter_state_dict(&peft, "default"));
    let rank = args.rank();
    let mut trainer = Trainer::new(args.training_args(), task).with_cancellation(cancel);
    if rank == 0 {
        // The other workers of a data-parallel run are silent: rank 0 speaks for the run.
        trainer = trainer.with_callback(progress(args.quiet));
    }
    if let Some(lock) = lock {
        trainer = trainer.with_output_dir_lock(lock);
    }
    if let Some(g) = group {
        trainer = trainer.with_collective(g);
    }
    let trained = trainer
        .train(peft, &train_data, eval_data.as_deref(), device)
        .map_err(|e| match e {
            peft_train::TrainError::NonFiniteLoss {
                value,
                step,
                epoch,
                dir,
            } => anyhow::anyhow!(
                "loss became {value} at step {step} (epoch {epoch}); nothing was saved for this \
                 step. Lower --learning-rate or check the data; the last checkpoint (if any) is \
                 in {}",
                dir.display()
            ),
            other => other.into(),
        })?;
    let mut summary = TrainSummary {
        steps: trained.global_step,
        first_loss: trained.first_loss.unwrap_or(f64::NAN),
        last_loss: trained.last_loss.unwrap_or(f64::NAN),
        train_accuracy: f64::NAN,
        eval_accuracy: None,
        adapter_dir: out.clone(),
        interrupted: trained.interrupted,
        nothing_to_train: trained.adapter_dir.is_none() && !trained.interrupted,
    };
    if rank != 0 {
        // Rank 0 wrote the adapter and checks it.
        return Ok(TrainOutcome {
            summary,
            model: trained.model,
        });
    }
    if trained.interrupted {
        eprintln!(
            "\ninterrupted: checkpoint saved in {} (resume with --resume latest)",
            out.display()
        );
        return Ok(TrainOutcome {
            summary,
            model: trained.model,
        });
    }
    if summary.nothing_to_train {
        // A run killed at its very end may not have copied its tokenizer yet.
        let tok_out = out.join("tokenizer.json");
        if !tok_out.exists() {
            peft_io::tensors::write_atomic(
                &tok_out,
                &std::fs::read(tok_path)
                    .with_context(|| format!("reading {}", tok_path.display()))?,
            )?;
        }
        println!(
            "nothing to train: the checkpoint is at step {} of {}; the adapter in {} was left as it is",
            trained.global_step,
            trained.total_steps,
            out.display()
        );
        return Ok(TrainOutcome {
            summary,
            model: trained.model,
        });
    }
    peft_io::tensors::write_atomic(
        &out.join("tokenizer.json"),
        &std::fs::read(tok_path).with_context(|| format!("reading {}", tok_path.display()))?,
    )?;
    if let Some(initial) = &initial {
        // PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`: checkpoints
        // keep the adapter of the residual base (resuming rebuilds that base); the final
        // adapter applies to the unchanged base, here and in PEFT.
        let c = peft_io::lora_init::save_as_plain_lora(&trained.model, "default", initial, out)?;
        println!(
            "converted the {} adapter to a plain LoRA of the original base (r = {}, \
             lora_alpha = {})",
            args.lora.init_lora_weights, c.r, c.lora_alpha
        );
    }
    let losses = logged_losses(&out.join(peft_train::checkpoint::METRICS));
    if !losses.is_empty() {
        crate::plot::loss_curve_png(&losses, &out.join("loss.png"))?;
    }
    println!("saved adapter to {}", out.display());

    // Reload from disk, as a user would, and predict.
    let inner_device = device.clone();
    let (reloaded, _) = peft_io::from_pretrained(reload(base_dir, &inner_device)?, out, "default")?;
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
    summary.train_accuracy = task
        .evaluate(model, &train_data, args.batch_size, &inner_device)?
        .accuracy;
    summary.eval_accuracy = match &eval_data {
        Some(e) => Some(
            task.evaluate(model, e, args.batch_size, &inner_device)?
                .accuracy,
        ),
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
        100.0 * summary.train_accuracy,
        majority(&train_data)
    );
    if let (Some(acc), Some(e)) = (summary.eval_accuracy, &eval_data) {
        println!(
            "reloaded adapter: test accuracy {:.1}% (majority class {:.1}%)",
            100.0 * acc,
            majority(e)
        );
    }
    Ok(TrainOutcome {
        summary,
        model: trained.model,
    })
}

/// Refuses a run whose parameters alone cannot fit in this machine's available memory: the
/// weights in f32, plus a gradient and AdamW's two moments for every trainable parameter.
/// Counting is lazy (nothing is allocated yet), so an absurd `--lora-r` is an error with the
/// numbers instead of an abort from a failed allocation.
fn check_memory(counts: &peft_core::ParamCounts) -> Result<()> {
    let need = (counts.all as u128 + 3 * counts.trainable as u128) * 4;
    let available = crate::available_memory();
    if let Some(avail) = available
        && need > avail
    {
        bail!(
            "the model and adapter need at least {:.1} GiB ({} parameters, {} trainable: weights, \
             gradients and AdamW state in f32) but only {:.1} GiB of memory is available; lower \
             the adapter's size (--lora-r, --num-virtual-tokens, --encoder-hidden-size) or use a \
             smaller model",
            need as f64 / (1u64 << 30) as f64,
            counts.all,
            counts.trainable,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// `(step, loss)` of every training row in `metrics.jsonl` (the whole run, across resumes).
fn logged_losses(path: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()? as usize, v["loss"].as_f64()?))
        })
        .collect()
}
