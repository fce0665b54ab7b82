//! A stop request (Ctrl-C) that reaches one data-parallel worker just after a step's reduce
//! is voted in the next step's reduce, so every worker stops after the same step: the worker
//! must not stop on its own a step before the others (which would then find its connection
//! closed and fail instead of saving the checkpoint).

use std::path::Path;
use std::sync::{Arc, Mutex};

use peft::burn::backend::{Autodiff, NdArray};
use peft::core::{LoraConfig, PeftConfigHeader, PeftModel, TargetModules, TaskType};
use peft::train::distributed::Collective;
use peft::train::trainer::{CancellationToken, Control, TrainerEvent};
use peft::train::{Seq2SeqLmTask, Trainer, TrainingArgs, read_examples};

type B = Autodiff<NdArray>;

/// A group of one worker (every sum is its own vector) that records its stop vote (the last
/// value) of each reduce: the trainer runs the data-parallel path, votes included.
struct Solo {
    votes: Arc<Mutex<Vec<f32>>>,
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> peft::train::Result<Vec<f32>> {
        self.votes
            .lock()
            .unwrap()
            .push(data.last().copied().unwrap_or(f32::NAN));
        Ok(data)
    }
}

#[test]
fn a_stop_after_a_reduce_is_voted_at_the_next_step() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_dir = root.join("tests/fixtures/t5/mt5");
    let out = std::env::temp_dir().join(format!("peft-stop-vote-{}", std::process::id()));
    let device = Default::default();
    let (base, _) = peft::io::load_t5::<B>(&model_dir, &device).expect("fixture model");
    let tok = peft::io::TextTokenizer::from_path(&model_dir.join("tokenizer.json"))
        .expect("fixture tokenizer");
    let config = LoraConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        ..LoraConfig::new(4, 8.0, TargetModules::list(["q", "v"]))
    };
    let peft = PeftModel::new(base, config, "default").expect("adapter");
    let data = read_examples(
        &root.join("examples/data/complaints/train.jsonl"),
        "text",
        "label",
    )
    .expect("bundled data");
    let task = Seq2SeqLmTask::new(&tok, &peft.base_model).with_max_lengths(32, 4);
    let args = TrainingArgs::new(&out)
        .with_max_steps(Some(8))
        .with_per_device_train_batch_size(2);
    let cancel = CancellationToken::new();
    let votes = Arc::new(Mutex::new(Vec::new()));
    let token = cancel.clone();
    // A Ctrl-C arriving right after step 3's reduce (its vote was "go on").
    let on_step = move |e: &TrainerEvent<'_>| {
        if let TrainerEvent::Step(s) = e
            && s.step == 3
        {
            token.cancel();
        }
        Control::Continue
    };
    let trained = Trainer::new(args, &task)
        .with_cancellation(cancel)
        .with_callback(on_step)
        .with_collective(Solo {
            votes: votes.clone(),
        })
        .train(peft, &data[..40], None, &device)
        .expect("the run stops cleanly");
    std::fs::remove_dir_all(&out).ok();
    assert!(trained.interrupted, "the run was interrupted");
    assert_eq!(
        trained.global_step, 4,
        "all workers stop after the step whose reduce carried the vote"
    );
    let votes = votes.lock().unwrap().clone();
    let steps = &votes[votes.len() - 4..];
    assert_eq!(
        steps,
        [0.0, 0.0, 0.0, 1.0],
        "stop votes of the 4 steps: {votes:?}"
    );
}
