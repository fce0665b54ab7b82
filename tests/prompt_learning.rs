//! Prompt learning against PEFT 0.21.2 itself (`tests/fixtures/prompt/make_fixtures.py`,
//! semantics in `tests/fixtures/prompt/SEMANTICS.md`):
//! - mT5 (SEQ_2_SEQ_LM): prompt tuning (RANDOM and TEXT init), P-tuning with the MLP and the
//!   LSTM encoder: eval logits, greedy and beam ids of the adapter PEFT saved, and the loss
//!   and every gradient of a training step from the encoder's weights at creation;
//! - BERT (SEQ_CLS): prompt tuning, P-tuning (MLP), prefix tuning with and without the
//!   projection: logits, loss and gradients (the classifier copy included).

mod common;

use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use common::methods::{batch, check_gradients, worst_gradient};
use common::{AB, B, Fixture, assert_close, fixture_path, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::{AdapterConfig, AdapterHost, PeftModel};
use peft::io::{from_pretrained, load_hf_weights, open_weights};
use peft::models::{BertForSequenceClassification, T5ForConditionalGeneration};

const MT5: [&str; 4] = [
    "prompt_random",
    "prompt_text",
    "ptuning_mlp",
    "ptuning_lstm",
];
const BERT: [&str; 4] = ["prompt_random", "ptuning_mlp", "prefix", "prefix_proj"];

fn mt5_base<BK: Backend>() -> T5ForConditionalGeneration<BK> {
    let dir = fixture_path("t5/mt5");
    let mut config = peft::io::hf_model::read_t5_config(&dir).unwrap();
    config.dropout_rate = 0.0;
    let mut base = T5ForConditionalGeneration::<BK>::new(&config, &Default::default()).unwrap();
    load_hf_weights(&mut base, &open_weights(&dir).unwrap()).unwrap();
    base
}

fn bert_base<BK: Backend>() -> BertForSequenceClassification<BK> {
    let dir = fixture_path("bert/bert_cls");
    let mut config = peft::io::hf_model::read_bert_config(&dir).unwrap();
    config.hidden_dropout_prob = 0.0;
    config.attention_probs_dropout_prob = 0.0;
    config.classifier_dropout = Some(0.0);
    let mut base = BertForSequenceClassification::<BK>::new(&config, &Default::default()).unwrap();
    load_hf_weights(&mut base, &open_weights(&dir).unwrap()).unwrap();
    base
}

/// The adapter of `dir` added for training (inference mode off), its tensors set to the
/// fixture's `param.<path>.<key>` (PEFT's values at creation).
fn trainable<BK: Backend, M: AdapterHost<BK>>(
    base: M,
    dir: &str,
    fx: &Fixture,
) -> PeftModel<BK, M> {
    let mut config = peft::io::read_adapter_config(&fixture_path(dir)).unwrap();
    config.set_inference_mode(false);
    let mut peft = PeftModel::new(base, config, "default").unwrap();
    let device = Default::default();
    let mut missing = Vec::new();
    peft.visit_adapter_params_mut("default", &mut |path, mut p| {
        let key = format!("param.{path}.{}", p.key);
        match fx.tensors.get(&key) {
            Some((_, v)) => p.param.assign_file(v.clone(), &p.layout, &device),
            None => missing.push(key),
        }
    });
    assert!(missing.is_empty(), "{missing:?}");
    peft.set_adapter(&["default"]).unwrap();
    peft
}

#[test]
fn mt5_prompt_adapters_match_peft_logits_and_generation() {
    let device = Default::default();
    for name in MT5 {
        let fx = Fixture::load(&format!("prompt/mt5_{name}_outputs.safetensors"));
        let (peft, report) = from_pretrained(
            mt5_base::<B>(),
            &fixture_path(&format!("prompt/mt5_{name}")),
            "default",
        )
        .unwrap();
        assert!(report.unused.is_empty(), "{name}: {report:?}");
        assert_eq!(
            peft.parameter_counts().trainable,
            0,
            "{name}: loaded for inference"
        );
        let (ids, mask, dec, _) = batch::<B>(&fx, &device);
        let logits = peft
            .base_model
            .forward(ids.clone(), Some(mask.clone()), dec)
            .logits;
        let d = assert_close(
            logits,
            fx.get("logits", &device),
            1e-4,
            &format!("{name} logits"),
        );
        let greedy = fx.rows("generated");
        let got =
            peft.base_model
                .generate_greedy(ids.clone(), Some(mask.clone()), greedy[0].len() - 1);
        assert_eq!(got, greedy, "{name}: greedy ids vs PEFT");
        let beam = fx.rows("generated_beam3");
        let got = peft
            .base_model
            .generate_beam(ids, Some(mask), beam[0].len() - 1, 3);
        assert_eq!(got, beam, "{name}: beam ids vs PEFT");
        eprintln!("{name}: logits within {d:.1e}, greedy and beam ids equal");
    }
}

#[test]
fn mt5_prompt_adapters_train_as_peft_does() {
    for name in MT5 {
        let fx = Fixture::load(&format!("prompt/mt5_{name}_outputs.safetensors"));
        let peft = trainable::<AB, _>(mt5_base::<AB>(), &format!("prompt/mt5_{name}"), &fx);
        let n = check_gradients(&peft, &fx, str::to_string);
        let trainable = peft.parameter_counts().trainable;
        let want: usize = fx
            .keys_with_prefix("param.")
            .iter()
            .map(|k| fx.tensors[&format!("param.{k}")].1.len())
            .sum();
        assert_eq!(trainable, want, "{name}: trainable parameters");
        eprintln!("{name}: loss and {n} gradients match");
    }
}

#[test]
fn text_init_takes_the_word_embeddings_of_the_repeated_tokens() {
    let fx = Fixture::load("prompt/mt5_prompt_text_outputs.safetensors");
    let ids: Vec<usize> = fx.ints["init_token_ids"]
        .1
        .iter()
        .map(|v| *v as usize)
        .collect();
    let mut config =
        peft::io::read_adapter_config(&fixture_path("prompt/mt5_prompt_text")).unwrap();
    config.set_inference_mode(false);
    let mut peft = PeftModel::new(mt5_base::<B>(), config, "default").unwrap();
    peft.set_adapter(&["default"]).unwrap();
    // The ids PEFT's tokenizer gave ("Label:" and </s>), cycled to 8 rows: the table is their
    // word embeddings.
    peft::core::prompt::model::init_from_token_ids(&mut peft, "default", &ids[..6]).unwrap();
    let mut table = Vec::new();
    peft.base_model
        .visit_prompt(&mut |s| table = to_vec(s.adapter("default").unwrap().embedding.val()));
    let want = &fx.tensors["param.prompt_encoder.embedding.weight"].1;
    assert_eq!(max_abs_diff(&table, want), 0.0);
    assert!(peft::core::prompt::model::init_from_token_ids(&mut peft, "default", &[1000]).is_err());
}

fn bert_inputs<BK: Backend>(fx: &Fixture) -> [Tensor<BK, 2, Int>; 3] {
    let device = Default::default();
    [
        fx.get_int("input_ids", &device),
        fx.get_int("attention_mask", &device),
        fx.get_int("token_type_ids", &device),
    ]
}

#[test]
fn bert_prompt_adapters_match_peft() {
    let device = Default::default();
    for name in BERT {
        let fx = Fixture::load(&format!("prompt/bert_{name}_outputs.safetensors"));
        let (peft, report) = from_pretrained(
            bert_base::<B>(),
            &fixture_path(&format!("prompt/bert_{name}")),
            "default",
        )
        .unwrap();
        assert!(report.unused.is_empty(), "{name}: {report:?}");
        let [ids, mask, types] = bert_inputs::<B>(&fx);
        let (logits, _) = peft.base_model.forward(ids, Some(mask), Some(types));
        let d = assert_close(
            logits,
            fx.get("logits", &device),
            1e-4,
            &format!("{name} logits"),
        );

        // A training step from PEFT's values at creation: loss and every gradient.
        let peft = trainable::<AB, _>(bert_base::<AB>(), &format!("prompt/bert_{name}"), &fx);
        let [ids, mask, types] = bert_inputs::<AB>(&fx);
        let (logits, _) = peft.base_model.forward(ids, Some(mask), Some(types));
        let labels: Tensor<AB, 2, Int> = fx.get_int::<AB, 1>("labels", &device).unsqueeze_dim(1);
        let loss = log_softmax(logits, 1).gather(1, labels).neg().mean();
        let want_loss = to_vec(fx.get::<B, 1>("loss", &device))[0];
        let got_loss = to_vec(loss.clone().inner())[0];
        assert!(
            (got_loss - want_loss).abs() < 1e-5,
            "{name}: loss {got_loss} vs {want_loss}"
        );
        let grads = GradientsParams::from_grads(loss.backward(), &peft.base_model);
        let (worst, key, n) = worst_gradient(&peft, &grads, &fx, str::to_string);
        assert!(worst < 1e-4, "{name}: gradient {key} off by {worst:e}");
        eprintln!("{name}: logits within {d:.1e}; loss and {n} gradients match");
    }
}

#[test]
fn prompt_adapters_save_what_peft_saves_and_refuse_what_peft_cannot_do() {
    let device = Default::default();
    // Saved: PEFT's key set and config, reloaded to the same logits.
    for (dir, is_t5) in [
        ("prompt/mt5_ptuning_lstm", true),
        ("prompt/bert_prefix_proj", false),
    ] {
        let out =
            std::env::temp_dir().join(format!("peft-prompt-save-{}-{}", is_t5, std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let fx_keys =
            common::methods::safetensors_keys(&fixture_path(dir).join("adapter_model.safetensors"));
        if is_t5 {
            let fx = Fixture::load("prompt/mt5_ptuning_lstm_outputs.safetensors");
            let peft = trainable::<B, _>(mt5_base::<B>(), dir, &fx);
            peft::io::save_pretrained(&peft, &out).unwrap();
            // The trainable encoder is kept aside so that a run can resume.
            assert!(out.join("prompt_encoder.safetensors").exists());
            let (reloaded, _) = from_pretrained(mt5_base::<B>(), &out, "default").unwrap();
            let (ids, mask, dec, _) = batch::<B>(&fx, &device);
            let a = peft
                .base_model
                .forward(ids.clone(), Some(mask.clone()), dec.clone())
                .logits;
            let b = reloaded.base_model.forward(ids, Some(mask), dec).logits;
            assert!(max_abs_diff(&to_vec(a), &to_vec(b)) < 1e-6);
        } else {
            let fx = Fixture::load("prompt/bert_prefix_proj_outputs.safetensors");
            let peft = trainable::<B, _>(bert_base::<B>(), dir, &fx);
            peft::io::save_pretrained(&peft, &out).unwrap();
        }
        assert_eq!(
            common::methods::safetensors_keys(&out.join("adapter_model.safetensors")),
            fx_keys,
            "{dir}"
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture_path(dir).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for k in [
            "peft_type",
            "num_virtual_tokens",
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "num_transformer_submodules",
            "inference_mode",
        ] {
            assert_eq!(cfg[k], want[k], "{dir}: {k}");
        }
        // A trainable P-tuning adapter cannot resume from PEFT's files alone (no encoder).
        if is_t5 {
            std::fs::remove_file(out.join("prompt_encoder.safetensors")).unwrap();
            let fx = Fixture::load("prompt/mt5_ptuning_lstm_outputs.safetensors");
            let mut peft = trainable::<B, _>(mt5_base::<B>(), dir, &fx);
            let e = peft::io::adapter::load_adapter_weights(&mut peft, &out, "default")
                .unwrap_err()
                .to_string();
            assert!(e.contains("load it for inference"), "{e}");
        }
        std::fs::remove_dir_all(&out).ok();
    }
    // Prefix tuning on T5 is refused with the reason; mixed batches and merging refuse prompts.
    let config = peft::core::PrefixTuningConfig::new(4);
    let e = PeftModel::new(mt5_base::<B>(), config, "p")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prefix tuning") && e.contains("PEFT 0.21.2"),
        "{e}"
    );
    let (mut peft, _) = from_pretrained(
        mt5_base::<B>(),
        &fixture_path("prompt/mt5_prompt_random"),
        "default",
    )
    .unwrap();
    assert!(peft.with_batch_adapters(&["default"], |_| ()).is_err());
    assert!(peft.merge_adapter(None, true).is_err());
    // Disabled adapters: the base model's logits exactly.
    let fx = Fixture::load("prompt/mt5_prompt_random_outputs.safetensors");
    let (ids, mask, dec, _) = batch::<B>(&fx, &device);
    peft.disable_adapters();
    let off = to_vec(
        peft.base_model
            .forward(ids.clone(), Some(mask.clone()), dec.clone())
            .logits,
    );
    let plain = to_vec(mt5_base::<B>().forward(ids, Some(mask), dec).logits);
    assert_eq!(max_abs_diff(&off, &plain), 0.0);
    assert!(matches!(
        peft.adapter_config("default"),
        Some(AdapterConfig::PromptTuning(_))
    ));
}
