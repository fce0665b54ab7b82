//! What the fixture tests of the weight-space methods (DoRA, LoHa, LoKr) share: the mT5 fixture
//! with an adapter loaded trainable (dropout off), T5's `shift_right`, and the checks each runs
//! against its PEFT fixture (eval logits, greedy ids, merge and exact unmerge, every gradient of
//! a training step, BERT SEQ_CLS logits, the saved key set).

use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft::core::check::max_abs_diff;
use peft::core::train::masked_cross_entropy;
use peft::core::{ParamRef, PeftModel};
use peft::io::{from_pretrained, load_bert_classifier, load_hf_weights, open_weights};
use peft::models::T5ForConditionalGeneration;

use super::{AB, B, Fixture, assert_close, fixture_path, to_vec};

/// The mT5 fixture with its dropout off (the fixtures' training steps ran with every dropout at
/// 0) and the adapter in `adapter_rel`, trainable as a resumed run has it (`from_pretrained`
/// loads for inference, as PEFT's does).
pub fn mt5_with<BK: Backend>(adapter_rel: &str) -> PeftModel<BK, T5ForConditionalGeneration<BK>> {
    let device = Default::default();
    let dir = fixture_path("t5/mt5");
    let mut config = peft::io::hf_model::read_t5_config(&dir).unwrap();
    config.dropout_rate = 0.0;
    let mut base = T5ForConditionalGeneration::<BK>::new(&config, &device).unwrap();
    let loaded = load_hf_weights(&mut base, &open_weights(&dir).unwrap()).unwrap();
    assert!(loaded.unused.is_empty() && loaded.newly_initialized.is_empty());
    let adapter = fixture_path(adapter_rel);
    let mut config = peft::io::read_adapter_config(&adapter).unwrap();
    config.set_inference_mode(false);
    let mut peft = PeftModel::new(base, config, "default").unwrap();
    let report = peft::io::adapter::load_adapter_weights(&mut peft, &adapter, "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    peft.set_adapter(&["default"]).unwrap(); // as the trainer does after loading a checkpoint
    peft
}

/// T5's `shift_right` of the labels: the start token, then the labels with -100 as pad.
pub fn shift_right(labels: &[Vec<i64>]) -> Vec<Vec<i64>> {
    labels
        .iter()
        .map(|l| {
            let mut d = vec![0];
            d.extend(l[..l.len() - 1].iter().map(|v| if *v < 0 { 0 } else { *v }));
            d
        })
        .collect()
}

/// `[rows, cols]` ids as an Int tensor.
pub fn int2<BK: Backend>(rows: &[Vec<i64>], device: &BK::Device) -> Tensor<BK, 2, Int> {
    let (r, c) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [r, c]), device)
}

/// Input ids, mask, decoder inputs and the label rows of a fixture batch.
pub type Batch<BK> = (
    Tensor<BK, 2, Int>,
    Tensor<BK, 2, Int>,
    Tensor<BK, 2, Int>,
    Vec<Vec<i64>>,
);

/// The fixture batch: input ids, mask, decoder inputs and the label rows.
pub fn batch<BK: Backend>(fx: &Fixture, device: &BK::Device) -> Batch<BK> {
    let labels = fx.rows_i64("labels");
    (
        fx.get_int::<BK, 2>("input_ids", device),
        fx.get_int::<BK, 2>("attention_mask", device),
        int2::<BK>(&shift_right(&labels), device),
        labels,
    )
}

/// Eval logits, greedy ids and merged logits against the fixture; unmerging restores the
/// adapted outputs exactly. Returns the adapted logits.
pub fn check_eval(
    peft: &mut PeftModel<B, T5ForConditionalGeneration<B>>,
    fx: &Fixture,
    what: &str,
) -> Vec<f32> {
    let device = Default::default();
    let (ids, mask, dec, _) = batch::<B>(fx, &device);
    let logits = peft
        .base_model
        .forward(ids.clone(), Some(mask.clone()), dec.clone())
        .logits;
    assert_close(
        logits.clone(),
        fx.get("logits", &device),
        1e-4,
        &format!("{what} logits vs PEFT"),
    );
    let expected = fx.rows("generated");
    let got =
        peft.base_model
            .generate_greedy(ids.clone(), Some(mask.clone()), expected[0].len() - 1);
    assert_eq!(got, expected, "{what}: greedy ids vs PEFT");
    peft.merge_adapter(None, true).unwrap();
    let merged = peft
        .base_model
        .forward(ids.clone(), Some(mask.clone()), dec.clone())
        .logits;
    assert_close(
        merged,
        fx.get("logits_merged", &device),
        1e-4,
        &format!("merged {what} logits vs PEFT"),
    );
    peft.unmerge_adapter();
    let again = to_vec(peft.base_model.forward(ids, Some(mask), dec).logits);
    let logits = to_vec(logits);
    assert_eq!(max_abs_diff(&again, &logits), 0.0, "{what}: exact unmerge");
    logits
}

/// HF's loss of one training step against the fixture's, and every adapter gradient against
/// `grad.<path>.<key>` (`file_key` maps our key to the name of PEFT's parameter), to 1e-4 of
/// each tensor's largest value. Returns the number of tensors compared.
pub fn check_gradients(
    peft: &PeftModel<AB, T5ForConditionalGeneration<AB>>,
    fx: &Fixture,
    file_key: impl Fn(&str) -> String,
) -> usize {
    let device = Default::default();
    let (ids, mask, dec, labels) = batch::<AB>(fx, &device);
    let logits = peft.base_model.forward(ids, Some(mask), dec).logits;
    let (loss, _) = masked_cross_entropy(logits, int2::<AB>(&labels, &device));
    let want_loss = to_vec(fx.get::<B, 1>("loss", &device))[0];
    let got_loss = to_vec(loss.clone().inner())[0];
    assert!(
        (got_loss - want_loss).abs() < 1e-4,
        "loss {got_loss} vs PEFT {want_loss}"
    );
    let grads = GradientsParams::from_grads(loss.backward(), &peft.base_model);
    let (worst, key, compared) = worst_gradient(peft, &grads, fx, file_key);
    assert!(
        worst < 1e-4,
        "largest relative gradient difference {worst} at {key}"
    );
    compared
}

/// Every gradient of adapter `default` against the fixture's `grad.<path>.<key>` (`file_key`
/// maps our key to PEFT's parameter name), relative to each tensor's largest value: the worst
/// difference (NaN counts as worst), where, and how many tensors were compared.
pub fn worst_gradient<M: peft::core::AdapterHost<AB>>(
    peft: &PeftModel<AB, M>,
    grads: &GradientsParams,
    fx: &Fixture,
    file_key: impl Fn(&str) -> String,
) -> (f32, String, usize) {
    let device = Default::default();
    let mut compared = 0;
    let mut worst = (0.0f32, String::new());
    peft.visit_adapter_params("default", &mut |path, p| {
        let key = format!("grad.{path}.{}", file_key(p.key));
        let missing = || -> ! { panic!("no gradient for {key}") };
        let (got, want) = match p.param {
            ParamRef::D1(t) => (
                to_vec(grads.get::<B, 1>(t.id).unwrap_or_else(|| missing())),
                to_vec(fx.get::<B, 1>(&key, &device)),
            ),
            // Transposed keys are burn's [in, out] against PyTorch's [out, in].
            ParamRef::D2(t) if p.layout == peft::core::FileLayout::Transposed => (
                to_vec(
                    grads
                        .get::<B, 2>(t.id)
                        .unwrap_or_else(|| missing())
                        .transpose(),
                ),
                to_vec(fx.get::<B, 2>(&key, &device)),
            ),
            ParamRef::D2(t) => (
                to_vec(grads.get::<B, 2>(t.id).unwrap_or_else(|| missing())),
                to_vec(fx.get::<B, 2>(&key, &device)),
            ),
        };
        let scale = want
            .iter()
            .fold(1e-6f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let d = max_abs_diff(&got, &want) / scale;
        if d.is_nan() || d > worst.0 {
            worst = (d, key.clone());
        }
        compared += 1;
    });
    (worst.0, worst.1, compared)
}

/// The BERT SEQ_CLS fixture with the adapter in `adapter_rel`: logits against `outputs_rel`.
pub fn check_bert_seq_cls(adapter_rel: &str, outputs_rel: &str, what: &str) {
    let device = Default::default();
    let (base, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (peft, report) = from_pretrained(base, &fixture_path(adapter_rel), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load(outputs_rel);
    let (logits, _) = peft.base_model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        None,
    );
    assert_close(
        logits,
        fx.get("logits", &device),
        1e-4,
        &format!("SEQ_CLS {what} logits vs PEFT"),
    );
}

/// The tensor names of a safetensors file, sorted.
pub fn safetensors_keys(path: &std::path::Path) -> Vec<String> {
    let b = std::fs::read(path).unwrap();
    let mut k: Vec<String> = safetensors::SafeTensors::deserialize(&b)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    k.sort();
    k
}

/// Saves `peft` and checks the key set against the fixture adapter's and the config's
/// `peft_type`.
pub fn check_saved_keys<M: peft::core::AdapterHost<B>>(
    peft: &PeftModel<B, M>,
    fixture_rel: &str,
    peft_type: &str,
) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!(
        "peft-saved-{}-{}",
        peft_type.to_lowercase(),
        std::process::id()
    ));
    peft::io::save_pretrained(peft, &out).unwrap();
    assert_eq!(
        safetensors_keys(&out.join("adapter_model.safetensors")),
        safetensors_keys(&fixture_path(fixture_rel).join("adapter_model.safetensors"))
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], peft_type);
    std::fs::remove_dir_all(&out).ok();
    cfg
}
