//! The training loop, with the care of Hugging Face's `Trainer`: AdamW over adapter parameters
//! only, warmup and decay, global gradient-norm clipping, gradient accumulation, per-epoch
//! evaluation, adapter-only checkpoints with optimizer and trainer state, resume, callbacks,
//! cancellation and a NaN/Inf guard.
//!
//! Runs are deterministic for a seed: the data order comes from (seed, epoch), dropout is
//! reseeded from (seed, micro-step) and adapter parameter ids from their keys, so a resumed run
//! ends where an uninterrupted one does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use peft_core::optim::AdamWConfig;
use peft_core::train::{LinearSchedule, SplitMix, clip_grad_norm};
use peft_core::{AdapterHost, PeftModel};
use serde_json::json;

use crate::args::{EvalStrategy, LrSchedulerType, TrainingArgs};
use crate::checkpoint::{self, OutputDirLock};
use crate::data::Example;
use crate::distributed::{self, Collective, ReduceStats};
use crate::error::{Result, TrainError, file_err};
use crate::task::{Evaluation, Task};

/// A flag another thread (a Ctrl-C handler, a server) sets to stop a run: the trainer saves a
/// checkpoint after the current optimizer step and returns with
/// [`TrainOutput::interrupted`] set. The library installs no signal handler.
#[derive(Clone, Debug, Default)]
pub struct CancellationToken(Arc<AtomicBool>);

impl CancellationToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop; returns whether it had been asked before.
    pub fn cancel(&self) -> bool {
        self.0.swap(true, Ordering::SeqCst)
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One optimizer step, as logged.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// Steps the run will take in all.
    pub total_steps: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Mean training loss of the step.
    pub loss: f64,
    /// The learning rate used.
    pub learning_rate: f64,
    /// Global gradient norm before clipping (`None` when clipping is off).
    pub grad_norm: Option<f64>,
    /// Input tokens per second in this step.
    pub tokens_per_s: f64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Steps done in this process (less than `step` after a resume).
    pub steps_this_run: usize,
    /// Data-parallel runs: the gradient all-reduce of this step.
    pub reduce: Option<ReduceStats>,
}

/// What the trainer reports to callbacks.
#[derive(Debug)]
pub enum TrainerEvent<'a> {
    /// Training starts (after any resume) at `step` of `total_steps`.
    Begin {
        /// The first step to run.
        step: usize,
        /// Steps in all.
        total_steps: usize,
        /// The trainable-parameter line.
        trainable: String,
    },
    /// Resumed from a checkpoint.
    Resumed {
        /// The checkpoint.
        checkpoint: &'a Path,
        /// Its step.
        step: usize,
    },
    /// `latest` was missing, empty or pointed nowhere; the newest complete checkpoint is used.
    ResumeFallback {
        /// What was wrong with `latest`.
        reason: String,
        /// The checkpoint used instead.
        checkpoint: &'a Path,
    },
    /// The checkpoint is at or past the last step: nothing was trained and the adapter in
    /// `output_dir` was left as it is.
    NothingToTrain {
        /// The checkpoint's step.
        step: usize,
        /// Steps in all.
        total_steps: usize,
    },
    /// An optimizer step finished.
    Step(&'a StepLog),
    /// An epoch ended (1-based `epoch` epochs are done).
    EpochEnd {
        /// Epochs done.
        epoch: usize,
        /// Steps done.
        step: usize,
    },
    /// An evaluation finished.
    Evaluated {
        /// Epochs done.
        epoch: usize,
        /// Steps done.
        step: usize,
        /// The result.
        eval: Evaluation,
    },
    /// A checkpoint was written (complete).
    Saved(&'a Path),
    /// Temporary files left by a killed run were removed.
    CleanedUp(&'a [PathBuf]),
}

/// Whether the run goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop after this event: a checkpoint is saved and the run returns.
    Stop,
}

/// Receives the trainer's events (progress, metrics) and may stop the run. Implemented for
/// closures `FnMut(&TrainerEvent) -> Control`.
pub trait TrainerCallback {
    /// Called for every event.
    fn on_event(&mut self, event: &TrainerEvent<'_>) -> Control;
}

impl<F: FnMut(&TrainerEvent<'_>) -> Control> TrainerCallback for F {
    fn on_event(&mut self, event: &TrainerEvent<'_>) -> Control {
        self(event)
    }
}

/// HF's `EarlyStoppingCallback`: stops when the evaluation loss has not improved by more than
/// `threshold` for `patience` evaluations.
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    /// The smallest decrease that counts as an improvement.
    pub threshold: f64,
    best: f64,
    bad: usize,
}

impl EarlyStopping {
    /// Stops after `patience` evaluations without improvement.
    pub fn new(patience: usize, threshold: f64) -> Self {
        EarlyStopping {
            patience,
            threshold,
            best: f64::INFINITY,
            bad: 0,
        }
    }
}

impl TrainerCallback for EarlyStopping {
    fn on_event(&mut self, event: &TrainerEvent<'_>) -> Control {
        if let TrainerEvent::Evaluated { eval, .. } = event {
            if eval.loss < self.best - self.threshold {
                self.best = eval.loss;
                self.bad = 0;
            } else {
                self.bad += 1;
                if self.bad >= self.patience {
                    return Control::Stop;
                }
            }
        }
        Control::Continue
    }
}

/// A finished (or stopped) run.
pub struct TrainOutput<B: AutodiffBackend, M: AdapterHost<B>> {
    /// The model as trained (base frozen, adapter attached and active).
    pub model: PeftModel<B, M>,
    /// Optimizer steps done in all (including those before a resume).
    pub global_step: usize,
    /// Steps the run was set to take.
    pub total_steps: usize,
    /// The first training loss this process logged.
    pub first_loss: Option<f64>,
    /// The last training loss this process logged.
    pub last_loss: Option<f64>,
    /// `(step, loss)` of every step this process ran.
    pub losses: Vec<(usize, f64)>,
    /// The last evaluation.
    pub last_eval: Option<Evaluation>,
    /// Stopped by the cancellation token (a checkpoint was saved; resume with `latest`).
    pub interrupted: bool,
    /// Stopped by a callback (e.g. [`EarlyStopping`]).
    pub stopped_by_callback: bool,
    /// Where the adapter was saved (`None` when nothing was trained or the run was interrupted).
    pub adapter_dir: Option<PathBuf>,
}

/// Runs a [`Task`] over data with [`TrainingArgs`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use burn::backend::{Autodiff, NdArray};
/// use peft_core::{LoraConfig, PeftModel, TargetModules};
/// use peft_train::{Example, Seq2SeqLmTask, Trainer, TrainingArgs};
/// type B = Autodiff<NdArray>;
/// let dir = std::path::Path::new("my-mt0");
/// let device = Default::default();
/// let (base, _) = peft_io::load_t5::<B>(dir, &device)?;
/// let tok = peft_io::TextTokenizer::from_path(&dir.join("tokenizer.json"))?;
/// let task = Seq2SeqLmTask::new(&tok, &base);
/// let peft = PeftModel::new(base, LoraConfig::new(8, 32.0, TargetModules::list(["q", "v"])), "default")?;
/// let data = vec![Example::new("the bus is late again", "complaint")];
/// let out = Trainer::new(TrainingArgs::new("out").with_learning_rate(1e-3), &task)
///     .train(peft, &data, None, &device)?;
/// println!("{} steps, adapter in {:?}", out.global_step, out.adapter_dir);
/// # Ok(()) }
/// ```
pub struct Trainer<'a, T: Task> {
    args: TrainingArgs,
    task: &'a T,
    callbacks: Vec<Box<dyn TrainerCallback + 'a>>,
    cancel: CancellationToken,
    lock: Option<OutputDirLock>,
    collective: Option<Box<dyn Collective + 'a>>,
}

impl<'a, T: Task> Trainer<'a, T> {
    /// A trainer for `task` with `args`.
    pub fn new(args: TrainingArgs, task: &'a T) -> Self {
        Trainer {
            args,
            task,
            callbacks: Vec::new(),
            cancel: CancellationToken::new(),
            lock: None,
            collective: None,
        }
    }

    /// Adds a callback (called in the order added).
    pub fn with_callback(mut self, callback: impl TrainerCallback + 'a) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Uses `token` to stop the run from elsewhere.
    pub fn with_cancellation(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// Trains under a lock the caller already holds on `output_dir`, for a caller that writes
    /// into the directory before training (a base model, a tokenizer) and must not do so
    /// unlocked. Without it, [`Trainer::train`] takes the lock itself.
    pub fn with_output_dir_lock(mut self, lock: OutputDirLock) -> Self {
        self.lock = Some(lock);
        self
    }

    /// Trains data-parallel as one worker of `collective`'s group (see [`distributed`]): the
    /// global micro-batch is `per_device_train_batch_size x world_size` examples and this
    /// worker takes its rank's slice; gradients of the trainable parameters are summed across
    /// workers before every optimizer step; rank 0 alone locks and writes `output_dir`.
    /// Every worker must be given the same arguments, data and model; the trainer checks it
    /// (and the starting adapter) with one reduce before the first step. Callbacks run on
    /// every worker and see the reduced loss and evaluation, the same everywhere, so a callback
    /// that stops on those stops every worker at the same step.
    pub fn with_collective(mut self, collective: impl Collective + 'a) -> Self {
        self.collective = Some(Box::new(collective));
        self
    }

    /// The arguments.
    pub fn args(&self) -> &TrainingArgs {
        &self.args
    }

    fn emit(&mut self, event: TrainerEvent<'_>) -> Control {
        let mut control = Control::Continue;
        for c in &mut self.callbacks {
            if c.on_event(&event) == Control::Stop {
                control = Control::Stop;
            }
        }
        control
    }

    /// Trains adapter `default` of `peft` on `train_data` (evaluating on `eval_data` as
    /// `eval_strategy` says), writing checkpoints and `metrics.jsonl` into `output_dir`, which
    /// is locked for the run. At the end the adapter is saved into `output_dir` in PEFT's (or
    /// AdapterHub's) format.
    pub fn train<B>(
        mut self,
        peft: PeftModel<B, T::Model<B>>,
        train_data: &[Example],
        eval_data: Option<&[Example]>,
        device: &B::Device,
    ) -> Result<TrainOutput<B, T::Model<B>>>
    where
        B: AutodiffBackend,
        T::Model<B>: AutodiffModule<B, InnerModule = T::Model<B::InnerBackend>>,
    {
        let result = self.run(peft, train_data, eval_data, device);
        if let Some(c) = self.collective.as_mut() {
            match &result {
                Ok(_) => c.finish(),
                Err(e) => c.abort(&e.to_string()),
            }
        }
        result
    }

    fn run<B>(
        &mut self,
        mut peft: PeftModel<B, T::Model<B>>,
        train_data: &[Example],
        eval_data: Option<&[Example]>,
        device: &B::Device,
    ) -> Result<TrainOutput<B, T::Model<B>>>
    where
        B: AutodiffBackend,
        T::Model<B>: AutodiffModule<B, InnerModule = T::Model<B::InnerBackend>>,
    {
        let args = self.args.clone();
        args.validate()?;
        if train_data.is_empty() {
            return Err(TrainError::InvalidArgument {
                name: "train_dataset",
                message: "no examples".into(),
            });
        }
        let out = args.output_dir.clone();
        let (rank, world) = match &self.collective {
            Some(c) => (c.rank(), c.world_size()),
            None => (0, 1),
        };
        // Rank 0 alone writes the output directory (the others only read a checkpoint).
        let writer = rank == 0;
        if writer {
            std::fs::create_dir_all(&out).map_err(file_err(&out))?;
        }
        let _lock = match self.lock.take() {
            _ if !writer => None,
            Some(lock) if same_dir(lock.dir(), &out) => Some(lock),
            Some(lock) => {
                return Err(TrainError::InvalidArgument {
                    name: "output_dir",
                    message: format!(
                        "the lock given is on {}, not on {}",
                        lock.dir().display(),
                        out.display()
                    ),
                });
            }
            None => Some(OutputDirLock::acquire(&out)?),
        };
        if writer {
            let cleaned = checkpoint::remove_stale_temporaries(&out);
            if !cleaned.is_empty() {
                self.emit(TrainerEvent::CleanedUp(&cleaned));
            }
        }
        stable_ids(&mut peft);

        let batch_size = args.per_device_train_batch_size;
        let accum = args.gradient_accumulation_steps;
        // One global micro-batch is `batch_size` examples per worker.
        let global_batch = batch_size * world;
        let micro_per_epoch = train_data.len().div_ceil(global_batch);
        let steps_per_epoch = (micro_per_epoch / accum).max(1);
        let total_steps = args
            .max_steps
            .unwrap_or(steps_per_epoch * args.num_train_epochs);
        let epochs = total_steps.div_ceil(steps_per_epoch);
        let schedule = LinearSchedule {
            lr: args.learning_rate,
            warmup: args.warmup_steps,
            total: total_steps,
        };
        let mut optim = AdamWConfig::new()
            .with_beta_1(args.adam_beta1 as f32)
            .with_beta_2(args.adam_beta2 as f32)
            .with_epsilon(args.adam_epsilon as f32)
            .with_weight_decay(args.weight_decay as f32)
            .init::<B, T::Model<B>>();

        let mut step = 0usize;
        if let Some(r) = &args.resume_from_checkpoint {
            let (dir, fallback) = checkpoint::resolve(&out, r)?;
            if let Some(reason) = fallback {
                self.emit(TrainerEvent::ResumeFallback {
                    reason,
                    checkpoint: &dir,
                });
            }
            let state = checkpoint::read_state(&dir)?;
            step = state.global_step;
            if step >= total_steps {
                // A run killed between its last checkpoint and its final save left the output
                // directory without (part of) its adapter: finish that save from the checkpoint.
                // An adapter that is there is never replaced.
                let completed =
                    writer && step == total_steps && checkpoint::complete_final_save(&dir, &out)?;
                if !completed {
                    self.emit(TrainerEvent::NothingToTrain { step, total_steps });
                }
                if completed {
                    peft_io::adapter::load_adapter_weights(&mut peft, &out, "default")?;
                    peft.set_adapter(&["default"])?;
                }
                return Ok(TrainOutput {
                    model: peft,
                    global_step: step,
                    total_steps,
                    first_loss: None,
                    last_loss: None,
                    losses: Vec::new(),
                    last_eval: None,
                    interrupted: false,
                    stopped_by_callback: false,
                    adapter_dir: completed.then(|| out.clone()),
                });
            }
            peft_io::adapter::load_adapter_weights(&mut peft, &dir, "default")?;
            peft.set_adapter(&["default"])?;
            let record =
                peft_io::checkpoint::load_record::<B, _>(&dir.join("optimizer.mpk"), device)?;
            optim = optim.load_record(record);
            if writer {
                checkpoint::truncate_metrics(&out, step)?;
            }
            self.emit(TrainerEvent::Resumed {
                checkpoint: &dir,
                step,
            });
        } else if writer {
            checkpoint::truncate_metrics(&out, 0)?;
        }
        let metrics_path = out.join(checkpoint::METRICS);
        let mut metrics = if writer {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(file_err(&metrics_path))?,
            )
        } else {
            None
        };
        let mut log = |v: serde_json::Value| -> Result<()> {
            match &mut metrics {
                Some(m) => writeln!(m, "{v}").map_err(file_err(&metrics_path)),
                None => Ok(()),
            }
        };
        if let Some(c) = self.collective.as_deref_mut() {
            check_same_run(c, &peft, &args, train_data, eval_data, step)?;
        }

        let trainable = peft.trainable_parameters_line();
        let mut stop = self.emit(TrainerEvent::Begin {
            step,
            total_steps,
            trainable,
        }) == Control::Stop;
        let start_step = step;
        let run_start = Instant::now();
        let mut losses = Vec::new();
        let mut last_eval = None;
        let mut interrupted = false;
        let state = |step: usize, epoch: usize| checkpoint::TrainerState {
            global_step: step,
            epoch,
            seed: args.seed,
            total_steps,
        };

        'epochs: for epoch in 0..epochs {
            if stop {
                break;
            }
            let order = SplitMix(args.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9))
                .permutation(train_data.len());
            let batches: Vec<Vec<&Example>> = order
                .chunks(global_batch)
                .map(|c| c.iter().map(|i| &train_data[*i]).collect())
                .collect();
            for s in 0..steps_per_epoch {
                let global = epoch * steps_per_epoch + s;
                if global < step {
                    continue; // done before the resume
                }
                if step >= total_steps {
                    break 'epochs;
                }
                let t0 = Instant::now();
                let mut acc = GradientsAccumulator::<T::Model<B>>::new();
                let mut loss_sum = 0.0;
                let mut tokens = 0usize;
                for m in 0..accum {
                    let Some(global_micro) = batches.get(s * accum + m) else {
                        break;
                    };
                    let batch = distributed::shard(global_micro, batch_size, rank);
                    // This shard's share of the global micro-batch's mean loss (1 alone).
                    let share = if world > 1 {
                        let all = self.task.count_targets(global_micro)?;
                        if batch.is_empty() || all == 0 {
                            continue;
                        }
                        Some(all)
                    } else {
                        None
                    };
                    // Dropout randomness is a function of (seed, micro-step, rank): resumable.
                    let micro_seed = args
                        .seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add((global * accum + m) as u64)
                        .wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    B::seed(device, micro_seed);
                    peft_core::dropout::seed(micro_seed);
                    let l = self.task.loss(&peft.base_model, batch, device)?;
                    tokens += l.tokens;
                    let weight = match share {
                        Some(all) => l.targets as f64 / all as f64 / accum as f64,
                        None => 1.0 / accum as f64,
                    };
                    let value = l.loss.clone().into_scalar().elem::<f64>();
                    if !value.is_finite() && world == 1 {
                        return Err(TrainError::NonFiniteLoss {
                            value,
                            step,
                            epoch,
                            dir: out.clone(),
                        });
                    }
                    loss_sum += value * weight;
                    let grads = (l.loss * weight).backward();
                    let grads = GradientsParams::from_grads(grads, &peft.base_model);
                    acc.accumulate(&peft.base_model, grads);
                }
                let mut grads = acc.grads();
                let mut reduce = None;
                // With workers, whether this step is the last one is what they voted in its
                // reduce: a Ctrl-C that arrives on one worker after the reduce goes to the next
                // step's vote, so that all stop after the same step (were it read again here,
                // that worker would stop a step before the others, which would then find its
                // connection closed).
                let mut voted_stop = None;
                if let Some(c) = self.collective.as_deref_mut() {
                    // One reduce: gradients, then the loss, the tokens and the stop votes.
                    let mut flat = Vec::new();
                    distributed::flatten_grads(&peft.base_model, &grads, &mut flat);
                    let at = flat.len();
                    flat.extend([
                        loss_sum as f32,
                        tokens as f32,
                        self.cancel.is_cancelled() as u8 as f32,
                    ]);
                    let (sum, stats) = distributed::timed_reduce(c, flat)?;
                    let (g, _) = distributed::unflatten_grads(&peft.base_model, &sum[..at]);
                    grads = g;
                    loss_sum = sum[at] as f64;
                    tokens = sum[at + 1] as usize;
                    let vote = sum[at + 2] > 0.0;
                    if vote {
                        self.cancel.cancel();
                    }
                    voted_stop = Some(vote);
                    if !loss_sum.is_finite() {
                        return Err(TrainError::NonFiniteLoss {
                            value: loss_sum,
                            step,
                            epoch,
                            dir: out.clone(),
                        });
                    }
                    reduce = Some(stats);
                }
                let grad_norm = (args.max_grad_norm > 0.0)
                    .then(|| clip_grad_norm(&peft.base_model, &mut grads, args.max_grad_norm));
                let lr = match args.lr_scheduler_type {
                    LrSchedulerType::Linear => schedule.lr_at(step),
                    LrSchedulerType::Constant if step < args.warmup_steps => schedule.lr_at(step),
                    LrSchedulerType::Constant => args.learning_rate,
                };
                peft.base_model = optim.step(lr, peft.base_model, grads);
                step += 1;
                losses.push((step, loss_sum));
                let dt = t0.elapsed().as_secs_f64();
                let entry = StepLog {
                    step,
                    total_steps,
                    epoch,
                    loss: loss_sum,
                    learning_rate: lr,
                    grad_norm,
                    tokens_per_s: tokens as f64 / dt.max(1e-9),
                    elapsed_s: run_start.elapsed().as_secs_f64(),
                    steps_this_run: step - start_step,
                    reduce,
                };
                let mut row = json!({"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr,
                    "grad_norm": grad_norm.unwrap_or(f64::NAN), "tokens_per_s": entry.tokens_per_s});
                if let Some(r) = reduce {
                    row["world_size"] = json!(world);
                    row["reduce_s"] = json!(r.seconds);
                    row["reduce_payload_bytes"] = json!(r.payload_bytes);
                }
                log(row)?;
                stop |= self.emit(TrainerEvent::Step(&entry)) == Control::Stop;
                interrupted = voted_stop.unwrap_or_else(|| self.cancel.is_cancelled());
                let periodic = args.save_steps.is_some_and(|n| step.is_multiple_of(n));
                if (periodic || interrupted || stop) && writer {
                    let dir = checkpoint::save(&peft, &optim, &out, &state(step, epoch))?;
                    self.emit(TrainerEvent::Saved(&dir));
                }
                if interrupted || stop {
                    break 'epochs;
                }
            }
            let epoch_done = ((epoch + 1) * steps_per_epoch).min(total_steps);
            if epoch_done <= start_step {
                continue; // this epoch ended before the resume: its evaluation is logged
            }
            stop |= self.emit(TrainerEvent::EpochEnd {
                epoch: epoch + 1,
                step,
            }) == Control::Stop;
            if let (EvalStrategy::Epoch, Some(eval)) = (args.eval_strategy, eval_data) {
                let model = peft.base_model.valid();
                let bs = args.per_device_eval_batch_size;
                let ev = match self.collective.as_deref_mut() {
                    None => self.task.evaluate(&model, eval, bs, device)?,
                    Some(c) => {
                        // Each worker evaluates a contiguous shard; the sums are reduced.
                        let part = distributed::shard(eval, eval.len().div_ceil(world), rank);
                        let mine = if part.is_empty() {
                            None
                        } else {
                            Some(self.task.evaluate(&model, part, bs, device)?)
                        };
                        let local = mine.map_or([0.0; 4], |e| {
                            [
                                e.loss * e.targets as f64,
                                e.targets as f64,
                                e.accuracy * e.examples as f64,
                                e.examples as f64,
                            ]
                        });
                        let sum = c.all_reduce_sum(local.iter().map(|v| *v as f32).collect())?;
                        Evaluation {
                            loss: sum[0] as f64 / (sum[1] as f64).max(1.0),
                            accuracy: sum[2] as f64 / (sum[3] as f64).max(1.0),
                            targets: sum[1] as usize,
                            examples: sum[3] as usize,
                        }
                    }
                };
                log(
                    json!({"step": step, "epoch": epoch + 1, "eval_loss": ev.loss,
                    "eval_accuracy": ev.accuracy}),
                )?;
                last_eval = Some(ev);
                stop |= self.emit(TrainerEvent::Evaluated {
                    epoch: epoch + 1,
                    step,
                    eval: ev,
                }) == Control::Stop;
            }
        }

        let adapter_dir = if interrupted || !writer {
            None
        } else {
            // The output directory is exactly what Python PEFT (or AdapterHub) loads.
            peft_io::save_pretrained(&peft, &out)?;
            Some(out.clone())
        };
        Ok(TrainOutput {
            model: peft,
            global_step: step,
            total_steps,
            first_loss: losses.first().map(|l| l.1),
            last_loss: losses.last().map(|l| l.1),
            losses,
            last_eval,
            interrupted,
            stopped_by_callback: stop && !interrupted,
            adapter_dir,
        })
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Gives every adapter parameter an id derived from its site path, key and adapter name, so
/// optimizer state saved in a checkpoint finds its parameters again in a new process.
pub fn stable_ids<B: AutodiffBackend, M: AdapterHost<B>>(peft: &mut PeftModel<B, M>) {
    for name in peft.adapter_names() {
        peft.visit_adapter_params_mut(&name, &mut |site, mut p| {
            let id = ParamId::from(fnv(&format!("{site}.{}.{name}", p.key)));
            p.param.set_id(id);
        });
    }
}

/// Before the first step of a data-parallel run: every worker must run the same job from the
/// same adapter. One reduce carries each worker's fingerprint of its arguments and data (which
/// must sum to `world` times rank 0's) and rank 0's trainable parameters (zeros from the
/// others), which every worker compares with its own.
fn check_same_run<B: AutodiffBackend, M: AdapterHost<B> + AutodiffModule<B>>(
    c: &mut dyn Collective,
    peft: &PeftModel<B, M>,
    args: &TrainingArgs,
    train_data: &[Example],
    eval_data: Option<&[Example]>,
    step: usize,
) -> Result<()> {
    let (rank, world) = (c.rank(), c.world_size());
    let mut text = format!(
        "{} {} {} {:?} {} {} {} {} {} {} {:?} {:?} {} {}",
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.seed,
        args.max_steps,
        args.num_train_epochs,
        args.learning_rate,
        args.weight_decay,
        args.max_grad_norm,
        args.warmup_steps,
        args.adam_epsilon,
        args.lr_scheduler_type,
        args.eval_strategy,
        step,
        train_data.len(),
    );
    for e in train_data.iter().chain(eval_data.unwrap_or_default()) {
        text.push_str(&e.text);
        text.push('\u{1f}');
        text.push_str(&e.label);
        text.push('\u{1e}');
    }
    let fingerprint = distributed::chunks16(fnv(&text));
    let mut params = Vec::new();
    distributed::flatten_params(&peft.base_model, &mut params);
    let mut flat: Vec<f32> = fingerprint.to_vec();
    if rank == 0 {
        flat.extend(&params);
    } else {
        flat.extend(std::iter::repeat_n(0.0, params.len()));
    }
    let sum = c.all_reduce_sum(flat)?;
    if sum.len() != 4 + params.len() {
        return Err(TrainError::Collective(format!(
            "rank {rank} has {} trainable values, the group reduced {}: the workers train \
             different adapters",
            params.len(),
            sum.len().saturating_sub(4)
        )));
    }
    if sum[..4]
        .iter()
        .zip(fingerprint)
        .any(|(s, f)| *s != f * world as f32)
    {
        return Err(TrainError::InvalidArgument {
            name: "world",
            message: format!(
                "rank {rank}'s training arguments, resume step or data differ from another \
                 worker's; start every worker with the same flags and files"
            ),
        });
    }
    if let Some(i) = (0..params.len()).find(|i| sum[4 + i].to_bits() != params[*i].to_bits()) {
        return Err(TrainError::InvalidArgument {
            name: "world",
            message: format!(
                "rank {rank}'s starting adapter differs from rank 0's (value {i}: {} vs {}); \
                 give every worker the same --seed and checkpoint",
                params[i],
                sum[4 + i]
            ),
        });
    }
    Ok(())
}
