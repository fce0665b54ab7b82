//! # peft-train
//!
//! Training for peft adapters, as `burn-train` is for burn: a library with no command line,
//! no printing, no signal handling and no `exit`.
//!
//! - [`TrainingArgs`]: Hugging Face `TrainingArguments`' names and defaults;
//! - [`Task`]: what a run learns ([`Seq2SeqLmTask`] for T5/mT5/mt0, [`SeqClsTask`] for BERT);
//! - [`DataCollatorForSeq2Seq`]: batches as tensors, with transformers' semantics;
//! - [`Trainer`]: the loop (AdamW on adapter parameters only, schedule, clipping,
//!   accumulation, evaluation, checkpoints and resume), reporting through
//!   [`TrainerCallback`]s ([`EarlyStopping`] is one) and stopped by a [`CancellationToken`];
//! - [`checkpoint`]: the output directory's lock, checkpoints, `latest` and `metrics.jsonl`.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use burn::backend::{Autodiff, NdArray};
//! use peft_core::{LoraConfig, PeftModel, TargetModules};
//! use peft_train::{Control, Example, Seq2SeqLmTask, Trainer, TrainerEvent, TrainingArgs};
//! type B = Autodiff<NdArray>;
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/mt5");
//! let device = Default::default();
//! let (base, _) = peft_io::load_t5::<B>(&dir, &device)?;
//! let tok = peft_io::TextTokenizer::from_path(&dir.join("tokenizer.json"))?;
//! let task = Seq2SeqLmTask::new(&tok, &base).with_max_lengths(32, 4);
//! let config = LoraConfig::new(4, 8.0, TargetModules::list(["q", "v"]));
//! let peft = PeftModel::new(base, config, "default")?;
//! let data = vec![Example::new("the bus is late", "complaint"), Example::new("nice day", "no")];
//! let out_dir = std::env::temp_dir().join(format!("peft-train-doc-{}", std::process::id()));
//! let args = TrainingArgs::new(&out_dir).with_max_steps(Some(2)).with_learning_rate(1e-2);
//! let mut steps = 0;
//! let out = Trainer::new(args, &task)
//!     .with_callback(|e: &TrainerEvent<'_>| {
//!         if let TrainerEvent::Step(_) = e {
//!             steps += 1;
//!         }
//!         Control::Continue
//!     })
//!     .train(peft, &data, None, &device)?;
//! assert_eq!(out.global_step, 2);
//! assert!(out_dir.join("adapter_model.safetensors").exists());
//! # std::fs::remove_dir_all(&out_dir).ok();
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod args;
pub mod checkpoint;
pub mod data;
pub mod distributed;
mod error;
pub mod task;
pub mod trainer;

pub use args::{EvalStrategy, LrSchedulerType, TrainingArgs};
pub use data::{
    DataCollatorForSeq2Seq, Example, Seq2SeqBatch, apply_template, parse_examples, read_examples,
};
pub use error::{Result, TrainError};
pub use task::{Evaluation, Seq2SeqLmTask, SeqClsTask, StepLoss, Task};
pub use trainer::{
    CancellationToken, Control, EarlyStopping, StepLog, TrainOutput, Trainer, TrainerCallback,
    TrainerEvent,
};
