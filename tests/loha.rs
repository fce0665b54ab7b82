//! LoHa (`LoHaConfig`) against PEFT 0.21.2 itself (`tests/fixtures/loha/make_fixtures.py`): an
//! mT5 adapter on q, v and wi_1 with every factor random (logits, greedy ids, merged logits, the
//! loss and every gradient of one training step), a BERT SEQ_CLS adapter, PEFT's file keys, and
//! PEFT's parameter line for mt0-large.

mod common;

use common::methods::{
    check_bert_seq_cls, check_eval, check_gradients, check_saved_keys, mt5_with,
};
use common::{AB, B, Fixture, read_json};
use peft::core::{LoHaConfig, PeftConfigHeader, PeftModel, TargetModules, TaskType};
use peft::models::{T5Config, T5ForConditionalGeneration};

#[test]
fn mt5_loha_logits_generation_and_merge_match_peft() {
    let mut peft = mt5_with::<B>("loha/mt5_loha");
    check_eval(
        &mut peft,
        &Fixture::load("loha/outputs.safetensors"),
        "LoHa",
    );
}

#[test]
fn mt5_loha_gradients_match_peft() {
    let peft = mt5_with::<AB>("loha/mt5_loha");
    let n = check_gradients(
        &peft,
        &Fixture::load("loha/outputs.safetensors"),
        str::to_string,
    );
    assert_eq!(n, 84, "21 sites x 4 factors");
}

#[test]
fn bert_seq_cls_loha_matches_peft() {
    check_bert_seq_cls("loha/bert_loha", "loha/bert_outputs.safetensors", "LoHa");
}

#[test]
fn loha_saves_peft_keys_and_counts_parameters_as_peft() {
    check_saved_keys(&mt5_with::<B>("loha/mt5_loha"), "loha/mt5_loha", "LOHA");
    // mt0-large, lazily (nothing is allocated).
    let config = T5Config::preset_by_name("mt0-large").unwrap();
    let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
    let loha = LoHaConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        ..LoHaConfig::new(8, 8.0, TargetModules::list(["q", "v"]))
    };
    let peft = PeftModel::new(model, loha, "default").unwrap();
    assert_eq!(
        peft.trainable_parameters_line(),
        read_json("loha/counts.json")["mt0-large loha r=8 alpha=8 q,v"]
            .as_str()
            .unwrap()
    );
}
