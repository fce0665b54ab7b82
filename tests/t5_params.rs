//! Parameter counts of the T5 family after `get_peft_model`, against PEFT.
//!
//! - The tiny T5 of `tests/fixtures/lora/targeting.json` (built by transformers 4.57.6 from the
//!   config stored there): for every LoRA config, PEFT's `print_trainable_parameters` line.
//! - mt0-large with the seed's config (r=8, alpha=32, dropout 0.1, SEQ_2_SEQ_LM, default
//!   targets): the line the seed's PEFT run printed, and T0_3B's 4,718,592 trainable parameters.
//!   These presets are built lazily: counting allocates no weights.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use common::{B, read_json};
use peft::core::{LoraConfig, PeftConfigHeader, PeftModel, TaskType};
use peft::models::{T5Config, T5ForConditionalGeneration};

fn seed_config() -> LoraConfig {
    LoraConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        r: 8,
        lora_alpha: 32.0,
        lora_dropout: 0.1,
        ..Default::default()
    }
}

#[test]
fn mt0_large_prints_the_seed_line() {
    let config = T5Config::preset_by_name("bigscience/mt0-large").unwrap();
    let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
    let peft = PeftModel::new(model, seed_config(), "default").unwrap();
    assert_eq!(
        peft.trainable_parameters_line(),
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"
    );
    // Counting allocated nothing: every parameter is still lazy.
    struct Lazy(usize);
    impl ModuleVisitor<B> for Lazy {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0 += usize::from(p.is_initialized());
        }
    }
    let mut lazy = Lazy(0);
    peft.base_model.visit(&mut lazy);
    assert_eq!(lazy.0, 0, "parameters were materialised");
}

#[test]
fn t0_3b_trains_4_718_592_lora_parameters() {
    let config = T5Config::preset_by_name("bigscience/T0_3B").unwrap();
    let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
    let peft = PeftModel::new(model, seed_config(), "default").unwrap();
    assert_eq!(peft.parameter_counts().trainable, 4_718_592);
}

#[test]
fn tiny_t5_counts_match_peft_for_every_config() {
    let fx = read_json("lora/targeting.json");
    let t5 = &fx["models"]["t5"];
    let config: T5Config = serde_json::from_value(t5["config"].clone()).unwrap();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        if case["model"] != "t5" || case.get("error").is_some() {
            continue;
        }
        let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
        let lora: LoraConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let peft = PeftModel::new(model, lora, "default").unwrap();
        assert_eq!(
            peft.trainable_parameters_line(),
            case["line"].as_str().unwrap(),
            "{}",
            case["config"]
        );
        let mut ours = peft.targeted_modules("default").to_vec();
        ours.sort();
        let theirs: Vec<String> = serde_json::from_value(case["targeted"].clone()).unwrap();
        assert_eq!(ours, theirs, "{}", case["config"]);
        checked += 1;
    }
    assert!(checked >= 12);
}
