//! DoRA (`LoraConfig { use_dora: true }`) against PEFT 0.21.2 itself
//! (`tests/fixtures/dora/make_fixtures.py`): an mT5 adapter on q, v and wi_1 with random B and
//! magnitudes away from the weight norms (logits, greedy ids, merged logits, the magnitude PEFT
//! initialises, and every gradient of one training step, which shows the weight norm is
//! detached), and a BERT SEQ_CLS adapter. Plus: unmerge restores the weights bit for bit, the
//! saved file has PEFT's keys, and mixed-adapter batches refuse DoRA as PEFT does.

mod common;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use common::{AB, B, Fixture, assert_close, fixture_path, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::train::masked_cross_entropy;
use peft::core::{AdapterConfig, AdapterHost, ParamRef, PeftModel, dora_weight_norm};
use peft::io::{from_pretrained, load_bert_classifier, load_hf_weights, open_weights};
use peft::models::T5ForConditionalGeneration;

fn mt5_dora<BK: burn::tensor::backend::Backend>() -> PeftModel<BK, T5ForConditionalGeneration<BK>> {
    let device = Default::default();
    // The base with its dropout off (the gradient fixture was made with every dropout at 0).
    let dir = fixture_path("t5/mt5");
    let mut config = peft::io::hf_model::read_t5_config(&dir).unwrap();
    config.dropout_rate = 0.0;
    let mut base = T5ForConditionalGeneration::<BK>::new(&config, &device).unwrap();
    let loaded = load_hf_weights(&mut base, &open_weights(&dir).unwrap()).unwrap();
    assert!(loaded.unused.is_empty() && loaded.newly_initialized.is_empty());
    // Trainable, as a run resumed from this adapter would have it (from_pretrained loads for
    // inference, as PEFT's does).
    let adapter = fixture_path("dora/mt5_dora");
    let mut config = peft::io::read_adapter_config(&adapter).unwrap();
    config.set_inference_mode(false);
    let mut peft = PeftModel::new(base, config, "default").unwrap();
    let report = peft::io::adapter::load_adapter_weights(&mut peft, &adapter, "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    peft.set_adapter(&["default"]).unwrap(); // as the trainer does after loading a checkpoint
    match peft.adapter_config("default") {
        Some(AdapterConfig::Lora(c)) => assert!(c.use_dora),
        other => panic!("{other:?}"),
    }
    peft
}

/// T5's `shift_right` of the labels: the start token, then the labels with -100 as pad.
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
fn mt5_dora_logits_generation_and_merge_match_peft() {
    let device = Default::default();
    let mut peft = mt5_dora::<B>();
    let fx = Fixture::load("dora/outputs.safetensors");
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
        "DoRA logits vs PEFT",
    );
    let expected = fx.rows("generated");
    let got =
        peft.base_model
            .generate_greedy(ids.clone(), Some(mask.clone()), expected[0].len() - 1);
    assert_eq!(got, expected, "greedy ids vs PEFT");

    // Merged: PEFT's merge (the norm of the unmerged base), then an exact unmerge.
    let mut before = Vec::new();
    peft.base_model
        .visit_linears(&mut |_, l| before.push(to_vec(l.weight.val())));
    peft.merge_adapter(None, true).unwrap();
    let merged = peft
        .base_model
        .forward(ids.clone(), Some(mask.clone()), dec.clone())
        .logits;
    assert_close(
        merged,
        fx.get("logits_merged", &device),
        1e-4,
        "merged DoRA logits vs PEFT",
    );
    peft.unmerge_adapter();
    let mut after = Vec::new();
    peft.base_model
        .visit_linears(&mut |_, l| after.push(to_vec(l.weight.val())));
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
        "unmerge restores every weight bit for bit"
    );
    let again = peft.base_model.forward(ids, Some(mask), dec).logits;
    assert_eq!(
        max_abs_diff(&to_vec(again), &to_vec(logits)),
        0.0,
        "unmerged outputs are the same as before the merge"
    );
}

#[test]
fn mt5_dora_magnitude_init_and_gradients_match_peft() {
    let device = Default::default();
    let fx = Fixture::load("dora/outputs.safetensors");
    let peft = mt5_dora::<AB>();

    // The magnitude PEFT initialised is the column norm of W + s B A (the saved A and B are the
    // ones it was computed from; only the magnitudes were scaled afterwards).
    let site = "encoder.block.0.layer.0.SelfAttention.q";
    let mut init = None;
    peft.base_model.visit_linears(&mut |path, l| {
        if path == site {
            let a = l.adapter("default").unwrap();
            init = Some(to_vec(
                dora_weight_norm(l.weight.val(), a.delta_weight()).valid(),
            ));
        }
    });
    let want = to_vec(fx.get::<B, 1>(&format!("magnitude_init.{site}"), &device));
    let d = max_abs_diff(&init.unwrap(), &want);
    assert!(d < 1e-5, "magnitude init differs from PEFT's by {d}");

    // One training step (dropout off): HF's loss and every adapter gradient.
    let ids = fx.get_int::<AB, 2>("input_ids", &device);
    let mask = fx.get_int::<AB, 2>("attention_mask", &device);
    let labels = fx.rows_i64("labels");
    let dec = int2::<AB>(&decoder_inputs(&labels), &device);
    let logits = peft.base_model.forward(ids, Some(mask), dec).logits;
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
        let file_key = if p.key == "lora_magnitude_vector" {
            "lora_magnitude_vector.weight".to_string()
        } else {
            p.key.to_string()
        };
        let key = format!("grad.{path}.{file_key}");
        let (got, want) = match p.param {
            ParamRef::D1(t) => (
                to_vec(
                    grads
                        .get::<B, 1>(t.id)
                        .unwrap_or_else(|| panic!("no gradient for {key}")),
                ),
                to_vec(fx.get::<B, 1>(&key, &device)),
            ),
            ParamRef::D2(t) => (
                // burn's [in, out] against PyTorch's [out, in].
                to_vec(
                    grads
                        .get::<B, 2>(t.id)
                        .unwrap_or_else(|| panic!("no gradient for {key}"))
                        .transpose(),
                ),
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
    assert_eq!(compared, 63, "21 sites x (A, B, magnitude)");
    assert!(
        worst.0 < 1e-4,
        "largest relative gradient difference {} at {}",
        worst.0,
        worst.1
    );
}

#[test]
fn bert_seq_cls_dora_matches_peft() {
    let device = Default::default();
    let (base, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (peft, report) = from_pretrained(base, &fixture_path("dora/bert_dora"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let fx = Fixture::load("dora/bert_outputs.safetensors");
    let (logits, _) = peft.base_model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        None,
    );
    assert_close(
        logits,
        fx.get("logits", &device),
        1e-4,
        "SEQ_CLS DoRA logits vs PEFT",
    );
}

#[test]
fn dora_saves_peft_keys_and_mixed_batches_refuse_it() {
    let mut peft = mt5_dora::<B>();
    let out = std::env::temp_dir().join(format!("peft-dora-save-{}", std::process::id()));
    peft::io::save_pretrained(&peft, &out).unwrap();
    let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let theirs = std::fs::read(fixture_path("dora/mt5_dora/adapter_model.safetensors")).unwrap();
    let keys = |b: &[u8]| {
        let mut k: Vec<String> = safetensors::SafeTensors::deserialize(b)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&theirs));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
    std::fs::remove_dir_all(&out).ok();

    let err = peft
        .with_batch_adapters(&["default"], |_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
}

/// The weights of every linear site, by path.
fn weights(peft: &PeftModel<B, T5ForConditionalGeneration<B>>) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    peft.base_model
        .visit_linears(&mut |p, l| v.push((p.to_string(), to_vec(l.weight.val()))));
    v
}

#[test]
fn dora_converts_to_lora_with_the_error_it_reports() {
    use peft::core::methods::lora::convert::dora_to_lora;
    let device = Default::default();
    let fx = Fixture::load("dora/outputs.safetensors");
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let dec = int2::<B>(&decoder_inputs(&fx.rows_i64("labels")), &device);
    let logits = |p: &PeftModel<B, T5ForConditionalGeneration<B>>| {
        to_vec(
            p.base_model
                .forward(ids.clone(), Some(mask.clone()), dec.clone())
                .logits,
        )
    };

    // Full rank (the sites are at most 32 x 48): the LoRA is DoRA's change itself.
    let mut peft = mt5_dora::<B>();
    let dora_logits = logits(&peft);
    let report = dora_to_lora(&mut peft, "default", "lora", 32).unwrap();
    assert_eq!(report.sites.len(), 21);
    assert!(report.relative_error < 1e-5, "{}", report.relative_error);
    peft.set_adapter(&["lora"]).unwrap();
    let d = max_abs_diff(&logits(&peft), &dora_logits);
    assert!(d < 1e-4, "full-rank LoRA vs DoRA logits: {d}");

    // Rank 2: the reported error is the one of the merged weights.
    let mut peft = mt5_dora::<B>();
    let base = weights(&peft);
    peft.merge_adapter(None, true).unwrap();
    let dora_w = weights(&peft);
    peft.unmerge_adapter();
    let report = dora_to_lora(&mut peft, "default", "lora", 2).unwrap();
    peft.set_adapter(&["lora"]).unwrap();
    peft.merge_adapter(None, true).unwrap();
    let lora_w = weights(&peft);
    for s in &report.sites {
        let i = base.iter().position(|b| b.0 == s.path).unwrap();
        let (mut e2, mut n2) = (0.0f64, 0.0f64);
        for ((w0, wd), wl) in base[i].1.iter().zip(&dora_w[i].1).zip(&lora_w[i].1) {
            let (d, l) = ((wd - w0) as f64, (wl - w0) as f64);
            e2 += (d - l) * (d - l);
            n2 += d * d;
        }
        let measured = (e2 / n2).sqrt();
        assert!(
            (measured - s.relative_error).abs() < 1e-3 * s.relative_error.max(1e-3),
            "{}: reported {} measured {measured}",
            s.path,
            s.relative_error
        );
    }
    assert!(
        report.relative_error > 0.01,
        "rank 2 cannot hold DoRA's rescaling of W"
    );
    let plain = match peft.adapter_config("lora") {
        Some(AdapterConfig::Lora(c)) => c.clone(),
        other => panic!("{other:?}"),
    };
    assert!(!plain.use_dora && plain.r == 2 && plain.lora_alpha == 2.0);
}
