//! The whole LoRA workflow on a seq2seq model, as a library user writes it:
//! HF model dir -> LoRA (r=8, alpha=32, dropout 0.1 on q, v) -> train -> save -> reload ->
//! generate.
//!
//! ```sh
//! cargo run --example lora_seq2seq                 # the tiny mT5 test fixture
//! cargo run --example lora_seq2seq -- path/to/mt0  # any T5/mT5/mt0 HF dir with tokenizer.json
//! ```

use std::path::{Path, PathBuf};

use peft::burn::backend::{Autodiff, NdArray};
use peft::core::{LoraConfig, PeftConfigHeader, PeftModel, TargetModules, TaskType};
use peft::train::{Seq2SeqLmTask, Trainer, TrainingArgs, read_examples};

type B = Autodiff<NdArray>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/t5/mt5"));
    let out = root.join("target/examples/lora_seq2seq");
    let device = Default::default();

    // 1. The pretrained base and its tokenizer, from a Hugging Face model directory.
    let (base, _) = peft::io::load_t5::<B>(&model_dir, &device)?;
    let tok = peft::io::TextTokenizer::from_path(&model_dir.join("tokenizer.json"))?;

    // 2. LoRA as in PEFT: LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, lora_alpha=32,
    //    lora_dropout=0.1, target_modules=["q", "v"]); the base is frozen.
    let config = LoraConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        lora_dropout: 0.1,
        ..LoraConfig::new(8, 32.0, TargetModules::list(["q", "v"]))
    };
    let peft = PeftModel::new(base, config, "default")?;
    println!("{}", peft.trainable_parameters_line());

    // 3. Train on the bundled complaint tweets with HF TrainingArguments names.
    let data = read_examples(
        &root.join("examples/data/complaints/train.jsonl"),
        "text",
        "label",
    )?;
    let task = Seq2SeqLmTask::new(&tok, &peft.base_model)
        .with_prompt_template("Tweet text: {text} Label:")
        .with_max_lengths(64, 4);
    let args = TrainingArgs::new(&out)
        .with_max_steps(Some(10))
        .with_learning_rate(3e-3)
        .with_per_device_train_batch_size(8);
    let trained = Trainer::new(args, &task).train(peft, &data[..80], None, &device)?;
    println!(
        "trained {} steps, loss {:.4} -> {:.4}",
        trained.global_step,
        trained.first_loss.unwrap_or(f64::NAN),
        trained.last_loss.unwrap_or(f64::NAN)
    );

    // 4. The trainer saved the adapter in PEFT's format (adapter_config.json +
    //    adapter_model.safetensors); reload it on a fresh base, for inference, without autodiff.
    let (base, _) = peft::io::load_t5::<NdArray>(&model_dir, &device)?;
    let (reloaded, _) = peft::io::from_pretrained(base, &out, "default")?;

    // 5. Generate.
    let prompt = "Tweet text: @HondaCustSvc Your customer service has been horrible. Label:";
    let batch = tok.encode_batch(&[prompt], Some(64), 0)?;
    let ids = peft::train::data::ids_tensor::<NdArray>(&batch.ids, &device);
    let mask = peft::train::data::ids_tensor::<NdArray>(&batch.mask, &device);
    let out_ids = reloaded.base_model.generate_greedy(ids, Some(mask), 4);
    let text = tok.decode(&out_ids[0].iter().map(|v| *v as u32).collect::<Vec<_>>())?;
    println!("{prompt:?} -> {text:?}");
    Ok(())
}
