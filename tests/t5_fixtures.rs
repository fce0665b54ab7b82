//! T5 (v1.0, tied) and mT5 (gated-gelu, untied, encoder 2 / decoder 3 blocks) loaded from the
//! model directories transformers 4.57.6 saved (`tests/fixtures/t5/make_fixtures.py`), run on a
//! padded batch: logits and encoder hidden states equal transformers' to 1e-4, greedy ids equal
//! `generate(do_sample=False, max_new_tokens=8)`, and beam-search ids equal `num_beams=3`. The same for a PEFT LoRA adapter on the mT5
//! loaded from PEFT's `save_pretrained` directory.

mod common;

use common::{B, Fixture, assert_close, check_close, fixture_path, read_json};
use peft::core::check::Failures;
use peft::io::{from_pretrained, load_t5};

const TOL: f32 = 1e-4;

fn check(model_dir: &str, outputs: &str, with_adapter: Option<&str>) {
    let device = Default::default();
    let (model, report) = load_t5::<B>(&fixture_path(model_dir), &device).unwrap();
    assert!(
        report.unused.is_empty(),
        "{model_dir}: unused tensors {:?}",
        report.unused
    );
    let fx = Fixture::load(outputs);
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let dec = fx.get_int::<B, 2>("decoder_input_ids", &device);
    let expected_ids = fx.rows("generated");
    let max_new = expected_ids[0].len() - 1;

    let model = match with_adapter {
        None => model,
        Some(adapter) => {
            let (peft, report) = from_pretrained(model, &fixture_path(adapter), "default").unwrap();
            assert!(
                report.unused.is_empty(),
                "{adapter}: unused {:?}",
                report.unused
            );
            peft.base_model
        }
    };
    let out = model.forward(ids.clone(), Some(mask.clone()), dec);
    let generated = model.generate_greedy(ids.clone(), Some(mask.clone()), max_new);
    let beam = model.generate_beam(ids, Some(mask), max_new, 3);
    let (logits, enc) = (out.logits, out.encoder_last_hidden_state);
    let what = format!("{model_dir} (adapter {with_adapter:?})");
    // Every comparison is made, and all that fail are reported together.
    let mut fails = Failures::new();
    check_close(
        &mut fails,
        logits,
        fx.get("logits", &device),
        TOL,
        &format!("{what}: logits"),
    );
    check_close(
        &mut fails,
        enc,
        fx.get("encoder_last_hidden_state", &device),
        TOL,
        &format!("{what}: encoder states"),
    );
    if generated != expected_ids {
        fails.fail(format!(
            "{what}: greedy ids {generated:?} vs {expected_ids:?}"
        ));
    }
    let expected_beam = fx.rows("generated_beam3");
    if beam != expected_beam {
        fails.fail(format!(
            "{what}: beam search ids (num_beams=3) {beam:?} vs {expected_beam:?}"
        ));
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

#[test]
fn t5_v1_0_tied_matches_transformers() {
    check("t5/t5_tied", "t5/t5_tied/outputs.safetensors", None);
}

#[test]
fn mt5_untied_uneven_depth_matches_transformers() {
    check("t5/mt5", "t5/mt5/outputs.safetensors", None);
}

#[test]
fn mt5_with_peft_lora_adapter_matches_peft() {
    check(
        "t5/mt5",
        "t5/mt5_lora_outputs.safetensors",
        Some("t5/mt5_lora"),
    );
}

/// The training loss: our masked cross-entropy on decoder inputs built HF's way (labels shifted
/// right behind the start token, -100 replaced by pad) equals transformers' `labels=` loss.
#[test]
fn training_loss_matches_transformers() {
    use burn::tensor::{Int, Tensor, TensorData};
    use peft::core::train::masked_cross_entropy;
    let device = Default::default();
    let mut fails = Failures::new();
    for (dir, outputs) in [
        ("t5/t5_tied", "t5/t5_tied/outputs.safetensors"),
        ("t5/mt5", "t5/mt5/outputs.safetensors"),
    ] {
        let (model, _) = match load_t5::<B>(&fixture_path(dir), &device) {
            Ok(m) => m,
            Err(e) => {
                fails.fail(format!("{dir}: {e}"));
                continue;
            }
        };
        let fx = Fixture::load(outputs);
        let labels = fx.rows_i64("labels");
        let dec: Vec<i64> = labels
            .iter()
            .flat_map(|r| std::iter::once(0).chain(r[..r.len() - 1].iter().map(|v| (*v).max(0))))
            .collect();
        let (b, l) = (labels.len(), labels[0].len());
        let dec = Tensor::<B, 2, Int>::from_data(TensorData::new(dec, [b, l]), &device);
        let labels =
            Tensor::<B, 2, Int>::from_data(TensorData::new(labels.concat(), [b, l]), &device);
        let out = model.forward(
            fx.get_int("input_ids", &device),
            Some(fx.get_int("attention_mask", &device)),
            dec,
        );
        let (loss, n) = masked_cross_entropy(out.logits, labels);
        if n != 4 + 2 + 3 {
            fails.fail(format!("{dir}: {n} label tokens counted, not 4 + 2 + 3"));
        }
        check_close(
            &mut fails,
            loss,
            fx.get("loss", &device),
            1e-5,
            &format!("{dir}: loss"),
        );
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

/// PEFT options through PEFT's own files: rank/alpha patterns with `layers_to_transform`
/// (safetensors) and rsLoRA (legacy `.bin`) give PEFT's logits.
#[test]
fn peft_option_files_match_peft() {
    let device = Default::default();
    let fx = Fixture::load("t5/mt5/outputs.safetensors");
    let mut fails = Failures::new();
    for dir in ["t5/mt5_lora_patterns", "t5/mt5_lora_rslora_bin"] {
        let (model, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
        let (peft, report) = match from_pretrained(model, &fixture_path(dir), "default") {
            Ok(p) => p,
            Err(e) => {
                fails.fail(format!("{dir}: {e}"));
                continue;
            }
        };
        if !report.unused.is_empty() {
            fails.fail(format!("{dir}: {report:?}"));
        }
        let out = peft.base_model.forward(
            fx.get_int("input_ids", &device),
            Some(fx.get_int("attention_mask", &device)),
            fx.get_int("decoder_input_ids", &device),
        );
        let expected = Fixture::load(&format!("{dir}/logits.safetensors"));
        check_close(
            &mut fails,
            out.logits,
            expected.get("logits", &device),
            TOL,
            dir,
        );
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

/// A sharded checkpoint (`model.safetensors.index.json`, as transformers writes large models)
/// loads to the same outputs as the single file.
#[test]
fn sharded_checkpoint_loads() {
    let device = Default::default();
    let src = fixture_path("t5/mt5");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let dir = std::env::temp_dir().join(format!("peft-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (model, report) = load_t5::<B>(&dir, &device).unwrap();
    assert!(report.unused.is_empty());
    let fx = Fixture::load("t5/mt5/outputs.safetensors");
    let out = model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        fx.get_int("decoder_input_ids", &device),
    );
    assert_close(out.logits, fx.get("logits", &device), TOL, "sharded logits");
    std::fs::remove_dir_all(&dir).ok();
}

/// Several adapters save like PEFT (`default` at the root, others in `<dir>/<name>/`) and load
/// back under any name with identical tensors.
#[test]
fn named_adapters_save_in_subdirectories_and_reload() {
    use peft::io::adapter::adapter_state_dict;
    let device = Default::default();
    let (model, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let (mut peft, _) = from_pretrained(model, &fixture_path("t5/mt5_lora"), "default").unwrap();
    peft::io::load_adapter(&mut peft, &fixture_path("t5/mt5_lora_patterns"), "patterns").unwrap();
    let dir = std::env::temp_dir().join(format!("peft-named-{}", std::process::id()));
    let written = peft::io::save_pretrained(&peft, &dir).unwrap();
    assert_eq!(written, vec![dir.clone(), dir.join("patterns")]);
    assert!(dir.join("patterns/adapter_config.json").exists());
    let (model, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let (reloaded, _) = from_pretrained(model, &dir.join("patterns"), "renamed").unwrap();
    assert_eq!(
        adapter_state_dict(&reloaded, "renamed"),
        adapter_state_dict(&peft, "patterns"),
        "tensors survive a save/load round trip under another name"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Beams that end with EOS early (the mt5 model with its `</s>` logit row scaled by 4, as in
/// `make_beam_eos.py`): greedy and `num_beams=3` ids equal transformers', EOS padding included.
#[test]
fn beams_finishing_with_eos_match_transformers() {
    use burn::module::Param;
    use burn::tensor::{Int, Tensor, TensorData};
    let device = Default::default();
    let fx = read_json("t5/beam_eos.json");
    let (mut model, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let head = model.lm_head.as_mut().unwrap();
    let [d, v] = head.weight.val().dims();
    let mut w: Vec<f32> = head.weight.val().into_data().to_vec().unwrap();
    for row in 0..d {
        w[row * v + 1] *= fx["eos_scale"].as_f64().unwrap() as f32;
    }
    head.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, v]), &device));
    let rows: Vec<Vec<i64>> = serde_json::from_value(fx["input_ids"].clone()).unwrap();
    let (b, l) = (rows.len(), rows[0].len());
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [b, l]), &device);
    let greedy: Vec<Vec<usize>> = serde_json::from_value(fx["beams_1"].clone()).unwrap();
    assert_eq!(
        model.generate_greedy(ids.clone(), None, 8),
        greedy,
        "greedy with EOS"
    );
    let beams: Vec<Vec<usize>> = serde_json::from_value(fx["beams_3"].clone()).unwrap();
    assert!(
        beams.iter().any(|r| r[1..].contains(&1)),
        "the fixture has EOS-terminated beams"
    );
    assert_eq!(
        model.generate_beam(ids, None, 8, 3),
        beams,
        "beam search with EOS"
    );
}
