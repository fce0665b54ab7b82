//! [`TrainingArgs`]: Hugging Face `TrainingArguments`' names and defaults, for the fields this
//! trainer implements.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// When to evaluate (HF `eval_strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalStrategy {
    /// Never.
    #[default]
    No,
    /// At the end of every epoch.
    Epoch,
}

/// The learning-rate schedule (HF `lr_scheduler_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedulerType {
    /// Linear warmup from 0, then linear decay to 0 at the last step (HF's default).
    #[default]
    Linear,
    /// Linear warmup, then constant.
    Constant,
}

/// How a run trains: Hugging Face `TrainingArguments` field names and defaults.
///
/// ```
/// use peft_train::TrainingArgs;
/// let args = TrainingArgs::new("out")
///     .with_num_train_epochs(2)
///     .with_learning_rate(1e-3)
///     .with_per_device_train_batch_size(4);
/// args.validate().unwrap();
/// assert_eq!(args.gradient_accumulation_steps, 1);
/// assert!(TrainingArgs::new("out").with_learning_rate(f64::NAN).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArgs {
    /// Where checkpoints, metrics and the final adapter go.
    pub output_dir: PathBuf,
    /// Epochs (HF's default 3).
    pub num_train_epochs: usize,
    /// Stop after this many optimizer steps (overrides `num_train_epochs`; HF's `-1` is `None`).
    pub max_steps: Option<usize>,
    /// Examples per training micro-batch (HF's default 8).
    pub per_device_train_batch_size: usize,
    /// Examples per evaluation batch (HF's default 8).
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate (HF's default 5e-5).
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW beta 1.
    pub adam_beta1: f64,
    /// AdamW beta 2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping (0 disables).
    pub max_grad_norm: f64,
    /// The schedule after warmup.
    pub lr_scheduler_type: LrSchedulerType,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Seed for data order and dropout.
    pub seed: u64,
    /// Save a checkpoint every N optimizer steps (`None`: only the final adapter).
    pub save_steps: Option<usize>,
    /// When to evaluate (needs evaluation data).
    pub eval_strategy: EvalStrategy,
    /// A checkpoint directory to resume from, or `latest` (the newest in `output_dir`).
    pub resume_from_checkpoint: Option<String>,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        TrainingArgs {
            output_dir: PathBuf::from("trainer_output"),
            num_train_epochs: 3,
            max_steps: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_steps: 0,
            seed: 42,
            save_steps: None,
            eval_strategy: EvalStrategy::No,
            resume_from_checkpoint: None,
        }
    }
}

macro_rules! with {
    ($($(#[$doc:meta])* $fn:ident: $field:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $fn(mut self, value: $ty) -> Self {
                self.$field = value;
                self
            }
        )*
    };
}

impl TrainingArgs {
    /// HF's defaults, writing into `output_dir`.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        TrainingArgs {
            output_dir: output_dir.into(),
            ..Default::default()
        }
    }

    with! {
        /// Sets `num_train_epochs`.
        with_num_train_epochs: num_train_epochs: usize;
        /// Sets `max_steps`.
        with_max_steps: max_steps: Option<usize>;
        /// Sets `per_device_train_batch_size`.
        with_per_device_train_batch_size: per_device_train_batch_size: usize;
        /// Sets `per_device_eval_batch_size`.
        with_per_device_eval_batch_size: per_device_eval_batch_size: usize;
        /// Sets `gradient_accumulation_steps`.
        with_gradient_accumulation_steps: gradient_accumulation_steps: usize;
        /// Sets `learning_rate`.
        with_learning_rate: learning_rate: f64;
        /// Sets `weight_decay`.
        with_weight_decay: weight_decay: f64;
        /// Sets `max_grad_norm`.
        with_max_grad_norm: max_grad_norm: f64;
        /// Sets `warmup_steps`.
        with_warmup_steps: warmup_steps: usize;
        /// Sets `seed`.
        with_seed: seed: u64;
        /// Sets `save_steps`.
        with_save_steps: save_steps: Option<usize>;
        /// Sets `eval_strategy`.
        with_eval_strategy: eval_strategy: EvalStrategy;
        /// Sets `resume_from_checkpoint`.
        with_resume_from_checkpoint: resume_from_checkpoint: Option<String>;
    }

    /// Refuses values no run can use: zero sizes and counts, negative or non-finite rates.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, message: String| Err(TrainError::InvalidArgument { name, message });
        let positive = [
            ("num_train_epochs", self.num_train_epochs),
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(name, "expected at least 1, found 0".into());
            }
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "expected at least 1, found 0".into());
        }
        if self.save_steps == Some(0) {
            return bad("save_steps", "expected at least 1, found 0".into());
        }
        let rates = [
            ("learning_rate", self.learning_rate),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("adam_epsilon", self.adam_epsilon),
        ];
        for (name, v) in rates {
            if !v.is_finite() || v < 0.0 {
                return bad(name, format!("expected a finite number >= 0, found {v}"));
            }
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, format!("expected a number in [0, 1), found {v}"));
            }
        }
        Ok(())
    }
}
