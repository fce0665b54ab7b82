//! LoKr (`LoKrConfig`) against PEFT 0.21.2 itself (`tests/fixtures/lokr/make_fixtures.py`): an
//! mT5 adapter on q, v and wi_1 (w1 full, w2 a rank-2 product) with every factor random (logits,
//! greedy ids, merged logits, the
//! loss and every gradient of one training step), a BERT SEQ_CLS adapter, PEFT's file keys, and
//! PEFT's parameter line for mt0-large.

mod common;

use common::methods::{
    check_bert_seq_cls, check_eval, check_gradients, check_saved_keys, mt5_with,
};
use common::{AB, B, Fixture, read_json};
use peft::core::{LoKrConfig, PeftConfigHeader, PeftModel, TargetModules, TaskType};
use peft::models::{T5Config, T5ForConditionalGeneration};

#[test]
fn mt5_lokr_logits_generation_and_merge_match_peft() {
    let mut peft = mt5_with::<B>("lokr/mt5_lokr");
    check_eval(
        &mut peft,
        &Fixture::load("lokr/outputs.safetensors"),
        "LoKr",
    );
}

#[test]
fn mt5_lokr_gradients_match_peft() {
    let peft = mt5_with::<AB>("lokr/mt5_lokr");
    let n = check_gradients(
        &peft,
        &Fixture::load("lokr/outputs.safetensors"),
        str::to_string,
    );
    assert_eq!(n, 63, "21 sites x (w1, w2_a, w2_b)");
}

#[test]
fn bert_seq_cls_lokr_with_decompose_both_matches_peft() {
    check_bert_seq_cls("lokr/bert_lokr", "lokr/bert_outputs.safetensors", "LoKr");
}

#[test]
fn lokr_saves_peft_keys_and_counts_parameters_as_peft() {
    check_saved_keys(&mt5_with::<B>("lokr/mt5_lokr"), "lokr/mt5_lokr", "LOKR");
    // mt0-large, lazily (nothing is allocated).
    let config = T5Config::preset_by_name("mt0-large").unwrap();
    let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
    let lokr = LoKrConfig {
        header: PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        ..LoKrConfig::new(8, 8.0, TargetModules::list(["q", "v"]))
    };
    let peft = PeftModel::new(model, lokr, "default").unwrap();
    assert_eq!(
        peft.trainable_parameters_line(),
        read_json("lokr/counts.json")["mt0-large lokr r=8 alpha=8 q,v"]
            .as_str()
            .unwrap()
    );
}
