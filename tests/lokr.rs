//! LoKr (`LoKrConfig`) against PEFT 0.21.2 itself (`tests/fixtures/lokr/make_fixtures.py`): an
//! mT5 adapter on q, v and wi_1 (w1 full, w2 a rank-2 product) with every factor random (logits, greedy ids, merged logits, the
//! loss and every gradient of one training step), a BERT SEQ_CLS adapter with `decompose_both`
//! (both factors products), PEFT's file keys, and
//! PEFT's parameter line for mt0-large.

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use common::{AB, B, Fixture, assert_close, fixture_path, read_json, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::train::masked_cross_entropy;
use peft::core::{AdapterConfig, ParamRef, PeftModel};
use peft::io::{from_pretrained, load_bert_classifier, load_hf_weights, open_weights};
use peft::models::{T5Config, T5ForConditionalGeneration};

/// The mT5 fixture (dropout off) with the LoKr adapter, trainable as a resumed run has it.
fn mt5_lokr<BK: burn::tensor::backend::Backend>() -> PeftModel<BK, T5ForConditionalGeneration<BK>> {
    let device = Default::default();
    let dir = fixture_path("t5/mt5");
    let mut config = peft::io::hf_model::read_t5_config(&dir).unwrap();
    config.dropout_rate = 0.0;
    let mut base = T5ForConditionalGeneration::<BK>::new(&config, &device).unwrap();
    load_hf_weights(&mut base, &open_weights(&dir).unwrap()).unwrap();
    let adapter = fixture_path("lokr/mt5_lokr");
    let mut config = peft::io::read_adapter_config(&adapter).unwrap();
    assert!(matches!(config, AdapterConfig::LoKr(_)), "{config:?}");
    config.set_inference_mode(false);
    let mut peft = PeftModel::new(base, config, "default").unwrap();
    let report = peft::io::adapter::load_adapter_weights(&mut peft, &adapter, "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    peft.set_adapter(&["default"]).unwrap();
    peft
}

fn decoder_inputs(labels: &[Vec<i64>]) -> Vec<Vec<i64>> {
    labels
        .iter()
        .map(|l| {
            let mut d = vec![0];
            d.extend(l[..l.len() - 1].iter().map(|v| if *v < 0 { 0 } else { *v }));
            d
        })
        .collect()
}

fn int2<BK: burn::tensor::backend::Backend>(
    rows: &[Vec<i64>],
    device: &BK::Device,
) -> Tensor<BK, 2, Int> {
    let (r, c) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [r, c]), device)
}

#[test]
fn mt5_lokr_logits_generation_and_merge_match_peft() {
    let device = Default::default();
    let mut peft = mt5_lokr::<B>();
    let fx = Fixture::load("lokr/outputs.safetensors");
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let dec = int2::<B>(&decoder_inputs(&fx.rows_i64("labels")), &device);
    let logits = peft
        .base_model
        .forward(ids.clone(), Some(mask.clone()), dec.clone())
        .logits;
    assert_close(
        logits.clone(),
        fx.get("logits", &device),
        1e-4,
        "LoKr logits vs PEFT",
    );
    let expected = fx.rows("generated");
    let got =
        peft.base_model
            .generate_greedy(ids.clone(), Some(mask.clone()), expected[0].len() - 1);
    assert_eq!(got, expected, "greedy ids vs PEFT");
    peft.merge_adapter(None, true).unwrap();
    let merged = peft
        .base_model
        .forward(ids.clone(), Some(mask.clone()), dec.clone())
        .logits;
    assert_close(
        merged,
        fx.get("logits_merged", &device),
        1e-4,
        "merged LoKr logits vs PEFT",
    );
    peft.unmerge_adapter();
    let again = peft.base_model.forward(ids, Some(mask), dec).logits;
    assert_eq!(
        max_abs_diff(&to_vec(again), &to_vec(logits)),
        0.0,
        "exact unmerge"
    );
}

#[test]
fn mt5_lokr_gradients_match_peft() {
    let device = Default::default();
    let fx = Fixture::load("lokr/outputs.safetensors");
    let peft = mt5_lokr::<AB>();
    let labels = fx.rows_i64("labels");
    let logits = peft
        .base_model
        .forward(
            fx.get_int::<AB, 2>("input_ids", &device),
            Some(fx.get_int::<AB, 2>("attention_mask", &device)),
            int2::<AB>(&decoder_inputs(&labels), &device),
        )
        .logits;
    let (loss, _) = masked_cross_entropy(logits, int2::<AB>(&labels, &device));
    let want_loss = to_vec(fx.get::<B, 1>("loss", &device))[0];
    let got_loss = to_vec(loss.clone().inner())[0];
    assert!(
        (got_loss - want_loss).abs() < 1e-4,
        "loss {got_loss} vs PEFT {want_loss}"
    );
    let grads = GradientsParams::from_grads(loss.backward(), &peft.base_model);
    let mut compared = 0;
    let mut worst = (0.0f32, String::new());
    peft.visit_adapter_params("default", &mut |path, p| {
        let key = format!("grad.{path}.{}", p.key);
        let ParamRef::D2(t) = p.param else {
            panic!("LoKr tensors are 2-D: {key}")
        };
        let got = to_vec(
            grads
                .get::<B, 2>(t.id)
                .unwrap_or_else(|| panic!("no gradient for {key}")),
        );
        let want = to_vec(fx.get::<B, 2>(&key, &device));
        let scale = want
            .iter()
            .fold(1e-6f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let d = max_abs_diff(&got, &want) / scale;
        if d.is_nan() || d > worst.0 {
            worst = (d, key.clone());
        }
        compared += 1;
    });
    assert_eq!(compared, 63, "21 sites x (w1, w2_a, w2_b)");
    assert!(
        worst.0 < 1e-4,
        "largest relative gradient difference {} at {}",
        worst.0,
        worst.1
    );
}

#[test]
fn bert_seq_cls_lokr_with_decompose_both_matches_peft() {
    let device = Default::default();
    let (base, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (peft, report) = from_pretrained(base, &fixture_path("lokr/bert_lokr"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load("lokr/bert_outputs.safetensors");
    let (logits, _) = peft.base_model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        None,
    );
    assert_close(
        logits,
        fx.get("logits", &device),
        1e-4,
        "SEQ_CLS LoKr logits vs PEFT",
    );
}

#[test]
fn lokr_saves_peft_keys_and_counts_parameters_as_peft() {
    let peft = mt5_lokr::<B>();
    let out = std::env::temp_dir().join(format!("peft-lokr-save-{}", std::process::id()));
    peft::io::save_pretrained(&peft, &out).unwrap();
    let keys = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        let mut k: Vec<String> = safetensors::SafeTensors::deserialize(&b)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&out.join("adapter_model.safetensors")),
        keys(&fixture_path("lokr/mt5_lokr/adapter_model.safetensors"))
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LOKR");
    std::fs::remove_dir_all(&out).ok();

    // mt0-large, lazily (nothing is allocated).
    let config = T5Config::preset_by_name("mt0-large").unwrap();
    let model = T5ForConditionalGeneration::<B>::new(&config, &Default::default()).unwrap();
    let lokr = peft::core::LoKrConfig {
        header: peft::core::PeftConfigHeader::default()
            .with_task_type(Some(peft::core::TaskType::Seq2SeqLm)),
        ..peft::core::LoKrConfig::new(8, 8.0, peft::core::TargetModules::list(["q", "v"]))
    };
    let peft = PeftModel::new(model, lokr, "default").unwrap();
    let want = read_json("lokr/counts.json");
    assert_eq!(
        peft.trainable_parameters_line(),
        want["mt0-large lokr r=8 alpha=8 q,v"].as_str().unwrap()
    );
}
