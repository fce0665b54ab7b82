//! Bottleneck adapters against AdapterHub's `adapters` 1.3.0 and IA3 against PEFT 0.21.2
//! (`tests/fixtures/bottleneck/make_fixtures.py`).
//!
//! - Houlsby, Pfeiffer and two non-default `BnConfig`s (per-layer reduction factor, `leave_out`,
//!   `ln_before`/`ln_after`, `residual_before_ln` false and `"post_add"`, `original_ln_after`
//!   false, fixed/learned/channel scaling, gelu/gelu_new/tanh) on a tiny BERT and a tiny T5
//!   (with a cross-attention adapter), loaded from the directories `model.save_adapter` wrote
//!   (safetensors and `.bin`): `last_hidden_state` / logits equal AdapterHub's to 1e-4.
//! - IA3 (PEFT defaults per model type) on BERT, T5 and mT5: outputs, merged outputs.
//! - Parameter counts equal AdapterHub's and PEFT's (BERT-large Houlsby 6,343,680).
//! - Saving writes AdapterHub's key set; saved adapters reload to the same outputs.
//! - Switching adapters touches no base weight; a training step gives gradients to the active
//!   adapter only.

mod common;

use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use common::{AB, B, Fixture, assert_close, fixture_path, read_json};
use peft::core::{AdapterHost, BnConfig, Ia3Config, PeftModel};
use peft::io::adapterhub;
use peft::io::{from_pretrained, load_adapter, load_bert, load_t5, save_pretrained};
use peft::models::{BertConfig, BertModel, T5ForConditionalGeneration};

const TOL: f32 = 1e-4;

/// A fresh directory under the system temp dir, unique to this process.
fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-bottleneck-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bert() -> BertModel<B> {
    let (m, report) =
        load_bert::<B>(&fixture_path("bottleneck/bert_base"), &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    m
}

fn t5(dir: &str) -> T5ForConditionalGeneration<B> {
    let (m, report) = load_t5::<B>(&fixture_path(dir), &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    m
}

fn bert_out(model: &BertModel<B>) -> Tensor<B, 3> {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    model
        .forward(
            fx.get_int("input_ids", &device),
            Some(fx.get_int("attention_mask", &device)),
            Some(fx.get_int("token_type_ids", &device)),
        )
        .last_hidden_state
}

fn t5_out(model: &T5ForConditionalGeneration<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/t5_outputs.safetensors");
    let o = model.forward(
        fx.get_int("input_ids", &device),
        Some(fx.get_int("attention_mask", &device)),
        fx.get_int("decoder_input_ids", &device),
    );
    (o.logits, o.encoder_last_hidden_state)
}

#[test]
fn bert_bottleneck_adapters_match_adapterhub() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    assert_close(bert_out(&bert()), fx.get("base", &device), TOL, "base");
    for (dir, key) in [
        ("bert_houlsby", "houlsby"),
        ("bert_houlsby_bin", "houlsby"),
        ("bert_pfeiffer", "pfeiffer"),
        ("bert_variant", "variant"),
        ("bert_variant2", "variant2"),
    ] {
        let (peft, report) =
            from_pretrained(bert(), &fixture_path(&format!("bottleneck/{dir}")), key).unwrap();
        assert!(
            report.unused.is_empty(),
            "{dir}: unused {:?}",
            report.unused
        );
        assert_close(bert_out(&peft.base_model), fx.get(key, &device), TOL, dir);
    }
}

#[test]
fn t5_bottleneck_adapters_match_adapterhub() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/t5_outputs.safetensors");
    let (logits, enc) = t5_out(&t5("bottleneck/t5_base"));
    assert_close(logits, fx.get("base", &device), TOL, "base logits");
    assert_close(enc, fx.get("base.encoder", &device), TOL, "base encoder");
    for key in ["houlsby", "pfeiffer", "cross", "variant"] {
        let dir = fixture_path(&format!("bottleneck/t5_{key}"));
        let (peft, report) = from_pretrained(t5("bottleneck/t5_base"), &dir, key).unwrap();
        assert!(
            report.unused.is_empty(),
            "{key}: unused {:?}",
            report.unused
        );
        let (logits, enc) = t5_out(&peft.base_model);
        assert_close(logits, fx.get(key, &device), TOL, &format!("{key} logits"));
        assert_close(
            enc,
            fx.get(&format!("{key}.encoder"), &device),
            TOL,
            &format!("{key} encoder"),
        );
    }
}

#[test]
fn several_adapters_switch_per_call_without_touching_the_base() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    let before: Vec<f32> = common::to_vec(bert().layer[0].query.weight.val());
    let (mut peft, _) =
        from_pretrained(bert(), &fixture_path("bottleneck/bert_houlsby"), "houlsby").unwrap();
    let (name, _) =
        adapterhub::load_adapter(&mut peft, &fixture_path("bottleneck/bert_pfeiffer"), None)
            .unwrap();
    assert_eq!(
        name, "pfeiffer",
        "the name comes from the AdapterHub config"
    );
    load_adapter(
        &mut peft,
        &fixture_path("bottleneck/bert_variant"),
        "variant",
    )
    .unwrap();
    for key in ["pfeiffer", "houlsby", "variant", "pfeiffer"] {
        peft.set_adapter(&[key]).unwrap();
        assert_close(
            bert_out(&peft.base_model),
            fx.get(key, &device),
            TOL,
            &format!("active {key}"),
        );
    }
    peft.disable_adapters();
    assert_close(
        bert_out(&peft.base_model),
        fx.get("base", &device),
        TOL,
        "disabled",
    );
    peft.enable_adapters();
    let err = peft.merge_adapter(None, true).unwrap_err().to_string();
    assert!(err.contains("bottleneck"), "{err}");
    peft.delete_adapter("pfeiffer").unwrap();
    peft.set_adapter(&["houlsby"]).unwrap();
    assert_close(
        bert_out(&peft.base_model),
        fx.get("houlsby", &device),
        TOL,
        "after delete",
    );
    let base = peft.unload();
    assert_eq!(common::to_vec(base.layer[0].query.weight.val()), before);
    assert_close(bert_out(&base), fx.get("base", &device), TOL, "unloaded");
}

#[test]
fn saved_bottleneck_adapters_have_adapterhub_keys_and_reload() {
    let src = fixture_path("bottleneck/bert_variant2");
    let (peft, _) = from_pretrained(bert(), &src, "variant2").unwrap();
    let dir = scratch("1");
    let written = save_pretrained(&peft, &dir).unwrap();
    // As PEFT: adapters not named `default` go to a subdirectory named after them.
    assert_eq!(written, vec![dir.join("variant2")]);
    let dir = dir.join("variant2");
    let theirs = adapterhub::open_weights(&src).unwrap();
    let ours = adapterhub::open_weights(&dir).unwrap();
    let (mut a, mut b) = (theirs.names(), ours.names());
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same keys as AdapterHub's save_adapter");
    for k in &a {
        assert_eq!(
            theirs.get_f32(k).unwrap(),
            ours.get_f32(k).unwrap(),
            "{k} round-trips bit for bit"
        );
    }
    let cfg = adapterhub::read_config(&dir).unwrap();
    let orig = adapterhub::read_config(&src).unwrap();
    assert_eq!(cfg.config, orig.config);
    assert_eq!(
        (cfg.hidden_size, cfg.model_type.as_deref()),
        (Some(32), Some("bert"))
    );
    assert_eq!(cfg.name, "variant2");

    // ln_before writes its LayerNorm under two names, as PyTorch's state dict does.
    let (peft, _) = from_pretrained(
        t5("bottleneck/t5_base"),
        &fixture_path("bottleneck/t5_variant"),
        "variant",
    )
    .unwrap();
    let dir = scratch("2");
    save_pretrained(&peft, &dir).unwrap();
    let dir = dir.join("variant");
    let theirs = adapterhub::open_weights(&fixture_path("bottleneck/t5_variant")).unwrap();
    let ours = adapterhub::open_weights(&dir).unwrap();
    let (mut a, mut b) = (theirs.names(), ours.names());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let (reloaded, _) = from_pretrained(t5("bottleneck/t5_base"), &dir, "v").unwrap();
    let fx = Fixture::load("bottleneck/t5_outputs.safetensors");
    assert_close(
        t5_out(&reloaded.base_model).0,
        fx.get("variant", &Default::default()),
        TOL,
        "reloaded",
    );
}

#[test]
fn wrong_model_for_an_adapterhub_adapter_is_refused() {
    let err = from_pretrained(
        t5("bottleneck/t5_base"),
        &fixture_path("bottleneck/bert_houlsby"),
        "x",
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("bert"),
        "{err}"
    );
}

#[test]
fn bottleneck_counts_match_adapterhub() {
    let counts = read_json("bottleneck/counts.json");
    let device = Default::default();
    let large = BertConfig::preset_by_name("bert-large-uncased").unwrap();
    for (name, config) in [
        ("houlsby", BnConfig::houlsby()),
        ("pfeiffer", BnConfig::pfeiffer()),
    ] {
        let model = BertModel::<B>::new(&large, true, &device).unwrap();
        let c = PeftModel::new(model, config, name)
            .unwrap()
            .parameter_counts();
        let theirs = &counts["bert_large"][name];
        assert_eq!(
            c.trainable as u64,
            theirs["trainable"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(c.all as u64, theirs["total"].as_u64().unwrap(), "{name}");
    }
    assert_eq!(
        PeftModel::new(
            BertModel::<B>::new(&large, true, &device).unwrap(),
            BnConfig::houlsby(),
            "h"
        )
        .unwrap()
        .trainable_parameters_line(),
        "trainable params: 6,343,680 || all params: 341,485,568 || trainable%: 1.8577"
    );
    // The tiny models, every variant, from the files AdapterHub wrote.
    for (model, keys) in [
        (
            "bert_tiny",
            vec!["houlsby", "pfeiffer", "variant", "variant2"],
        ),
        ("t5_tiny", vec!["houlsby", "pfeiffer", "cross", "variant"]),
    ] {
        for key in keys {
            let dir = fixture_path(&format!(
                "bottleneck/{}_{key}",
                model.trim_end_matches("_tiny")
            ));
            let c = if model == "bert_tiny" {
                let (mut p, _) = from_pretrained(bert(), &dir, key).unwrap();
                p.set_frozen(key, false).unwrap();
                p.parameter_counts()
            } else {
                let (mut p, _) = from_pretrained(t5("bottleneck/t5_base"), &dir, key).unwrap();
                p.set_frozen(key, false).unwrap();
                p.parameter_counts()
            };
            let theirs = &counts[model][key];
            assert_eq!(
                c.trainable as u64,
                theirs["trainable"].as_u64().unwrap(),
                "{model} {key}"
            );
            assert_eq!(
                c.all as u64,
                theirs["total"].as_u64().unwrap(),
                "{model} {key}"
            );
        }
    }
}

#[test]
fn ia3_matches_peft_with_merge() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/ia3_outputs.safetensors");
    let (mut peft, report) =
        from_pretrained(bert(), &fixture_path("bottleneck/ia3_bert"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    assert_close(
        bert_out(&peft.base_model),
        fx.get("bert", &device),
        TOL,
        "ia3 bert",
    );
    peft.merge_adapter(None, true).unwrap();
    assert_close(
        bert_out(&peft.base_model),
        fx.get("bert.merged", &device),
        TOL,
        "ia3 bert merged",
    );
    peft.unmerge_adapter();
    assert_close(
        bert_out(&peft.base_model),
        fx.get("bert", &device),
        TOL,
        "ia3 bert unmerged",
    );

    for (model, dir, key) in [
        ("bottleneck/t5_base", "bottleneck/ia3_t5", "t5"),
        ("bottleneck/t5_base", "bottleneck/ia3_t5_bin", "t5"),
        ("bottleneck/mt5_base", "bottleneck/ia3_mt5", "mt5"),
    ] {
        let (peft, report) = from_pretrained(t5(model), &fixture_path(dir), "default").unwrap();
        assert!(report.unused.is_empty(), "{dir}: {report:?}");
        assert_close(t5_out(&peft.base_model).0, fx.get(key, &device), TOL, dir);
        let merged = peft.merge_and_unload(true).unwrap();
        assert_close(
            t5_out(&merged).0,
            fx.get(&format!("{key}.merged"), &device),
            TOL,
            &format!("{dir} merged"),
        );
    }
    let (base_logits, _) = t5_out(&t5("bottleneck/mt5_base"));
    assert_close(base_logits, fx.get("mt5.base", &device), TOL, "mt5 base");
}

#[test]
fn ia3_counts_and_saved_files_match_peft() {
    let counts = read_json("bottleneck/counts.json");
    for (model, cfg_model, key) in [
        ("bert", None, "ia3_bert"),
        ("t5", Some("bottleneck/t5_base"), "ia3_t5"),
        ("mt5", Some("bottleneck/mt5_base"), "ia3_mt5"),
    ] {
        let c = match cfg_model {
            None => PeftModel::new(bert(), Ia3Config::default(), "default")
                .unwrap()
                .parameter_counts(),
            Some(m) => PeftModel::new(t5(m), Ia3Config::default(), "default")
                .unwrap()
                .parameter_counts(),
        };
        let theirs = &counts[key];
        assert_eq!(
            c.trainable as u64,
            theirs["trainable"].as_u64().unwrap(),
            "{model}"
        );
        assert_eq!(c.all as u64, theirs["total"].as_u64().unwrap(), "{model}");
    }
    // Saved keys and shapes equal PEFT's; the config round-trips with resolved targets.
    let src = fixture_path("bottleneck/ia3_t5");
    let (peft, _) = from_pretrained(t5("bottleneck/t5_base"), &src, "default").unwrap();
    let dir = scratch("3");
    save_pretrained(&peft, &dir).unwrap();
    let theirs = peft::io::adapter::open_adapter_weights(&src).unwrap();
    let ours = peft::io::adapter::open_adapter_weights(&dir).unwrap();
    let (mut a, mut b) = (theirs.names(), ours.names());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for k in &a {
        assert_eq!(theirs.get_f32(k).unwrap(), ours.get_f32(k).unwrap(), "{k}");
    }
    let cfg = peft::io::read_adapter_config(&dir).unwrap();
    let orig = peft::io::read_adapter_config(&src).unwrap();
    assert_eq!(cfg, orig);
}

#[test]
fn a_training_step_changes_only_the_active_adapter() {
    let device = Default::default();
    let config = BertConfig::from_json(
        &std::fs::read_to_string(fixture_path("bottleneck/bert_base/config.json")).unwrap(),
    )
    .unwrap();
    let model = BertModel::<AB>::new(&config, false, &device).unwrap();
    let mut peft = PeftModel::new(model, BnConfig::houlsby(), "a").unwrap();
    peft.add_adapter("b", BnConfig::pfeiffer()).unwrap();
    peft.add_adapter("c", Ia3Config::default()).unwrap();
    let counts = peft.parameter_counts();
    // Reduction factor 16 on hidden 32: bottleneck 2, 162 parameters a site, 6 sites.
    assert_eq!(counts.trainable, 972, "only `a` trains: {counts:?}");
    let ids = Tensor::<AB, 2, burn::tensor::Int>::from_data([[1, 5, 7, 9]], &device);
    let loss = peft
        .base_model
        .forward(ids, None, None)
        .last_hidden_state
        .powf_scalar(2.0)
        .sum();
    let grads = GradientsParams::from_grads(loss.backward(), &peft.base_model);
    let mut with_grad = 0;
    peft.base_model.visit_sublayers(&mut |site, adapters| {
        for a in &adapters.adapters {
            let g = grads
                .get::<burn::backend::NdArray, 2>(a.up_weight.id)
                .is_some();
            assert_eq!(g, a.name == "a", "{} {}", site.path, a.name);
            with_grad += usize::from(g);
        }
    });
    assert_eq!(with_grad, 6, "houlsby: two sites in each of 3 layers");
    peft.base_model.visit_linears(&mut |path, l| {
        assert!(
            grads
                .get::<burn::backend::NdArray, 2>(l.weight.id)
                .is_none(),
            "{path}"
        );
        for a in &l.ia3 {
            assert!(
                grads.get::<burn::backend::NdArray, 1>(a.ia3_l.id).is_none(),
                "{path} ia3"
            );
        }
    });
    // 2 weights + 2 biases per site, 6 sites.
    assert_eq!(grads.len(), 24);
}

#[test]
fn bad_adapterhub_files_get_clear_errors() {
    let src = fixture_path("bottleneck/bert_houlsby");
    let case = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let d = scratch(name);
        std::fs::copy(
            src.join("adapter.safetensors"),
            d.join("adapter.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut cfg);
        std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
        from_pretrained(bert(), &d, "x")
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = case("rf", &|c| c["config"]["reduction_factor"] = 2.into());
    assert!(
        err.contains("adapter.safetensors")
            && err.contains(
                "encoder.layer.0.attention.output.adapters.houlsby.adapter_down.0.weight"
            )
            && err.contains("expected [16, 32], found [8, 32]"),
        "{err}"
    );
    let err = case("ln", &|c| c["config"]["ln_after"] = true.into());
    assert!(
        err.contains("missing") && err.contains("adapter_norm_after.weight"),
        "{err}"
    );
    let err = case("arch", &|c| {
        c["config"]["architecture"] = "prefix_tuning".into()
    });
    assert!(
        err.contains("adapter_config.json") && err.contains("prefix_tuning"),
        "{err}"
    );
    let err = case("gating", &|c| c["config"]["use_gating"] = true.into());
    assert!(err.contains("use_gating"), "{err}");
    let err = case("hidden", &|c| c["hidden_size"] = 64.into());
    assert!(err.contains("hidden_size mismatch"), "{err}");

    let d = scratch("truncated");
    std::fs::copy(
        src.join("adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter.safetensors")).unwrap();
    std::fs::write(d.join("adapter.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = from_pretrained(bert(), &d, "x")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter.safetensors"), "{err}");
    std::fs::write(d.join("adapter_config.json"), "{\"config\": {").unwrap();
    let err = from_pretrained(bert(), &d, "x")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json: invalid JSON"), "{err}");
}

#[test]
fn zero_up_projection_leaves_outputs_unchanged_and_inits_have_their_statistics() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    let tx = Fixture::load("bottleneck/t5_outputs.safetensors");
    for preset in [BnConfig::houlsby(), BnConfig::pfeiffer()] {
        // mam_adapter: kaiming-uniform down, zero up: the adapter starts as a no-op.
        let mam = BnConfig {
            init_weights: "mam_adapter".into(),
            reduction_factor: peft::core::bottleneck::ReductionFactor::One(4.0),
            ..preset.clone()
        };
        let peft = PeftModel::new(bert(), mam.clone(), "a").unwrap();
        assert_close(
            bert_out(&peft.base_model),
            fx.get("base", &device),
            TOL,
            "bert mam",
        );
        let peft = PeftModel::new(t5("bottleneck/t5_base"), mam, "a").unwrap();
        assert_close(
            t5_out(&peft.base_model).0,
            tx.get("base", &device),
            TOL,
            "t5 mam",
        );
    }
    // houlsby init: N(0, 0.01) truncated at +-0.02; bert init: N(0, 0.02), zero biases.
    let big = BertConfig::preset_by_name("bert-base-uncased").unwrap();
    let model = BertModel::<B>::new(&big, false, &device).unwrap();
    for (init, std, bound) in [("houlsby", 0.01f32, Some(0.02f32)), ("bert", 0.02, None)] {
        let c = BnConfig {
            init_weights: init.into(),
            ..BnConfig::pfeiffer()
        };
        let peft = PeftModel::new(model.clone(), c, "a").unwrap();
        let a = peft.base_model.layer[0]
            .output_adapters
            .adapter("a")
            .unwrap();
        let w = common::to_vec(a.down_weight.val());
        let n = w.len() as f32;
        let mean = w.iter().sum::<f32>() / n;
        let sd = (w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        // A normal truncated at 2 sigma has sd 0.880 sigma.
        let want = if bound.is_some() { 0.880 * std } else { std };
        assert!((sd - want).abs() < 0.05 * want, "{init}: sd {sd} vs {want}");
        if let Some(b) = bound {
            assert!(w.iter().all(|x| x.abs() <= b), "{init}: inside +-{b}");
        }
        assert!(common::to_vec(a.up_bias.val()).iter().all(|x| *x == 0.0));
    }
}

#[test]
fn ia3_seq_cls_trains_and_saves_the_head_as_peft() {
    // PEFT 0.21.2 on tests/fixtures/bert/bert_cls with IA3Config(task_type="SEQ_CLS"):
    // get_nb_trainable_parameters() == (579, 32742), modules_to_save == ["classifier", "score"].
    let (model, _) =
        peft::io::load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &Default::default())
            .unwrap();
    let config = Ia3Config {
        header: peft::core::PeftConfigHeader::default()
            .with_task_type(Some(peft::core::TaskType::SeqCls)),
        ..Default::default()
    };
    let peft = PeftModel::new(model, config, "default").unwrap();
    let c = peft.parameter_counts();
    assert_eq!((c.trainable, c.all), (579, 32742));
    let saved = peft::io::adapter::saved_ia3_config(&peft, "default").unwrap();
    assert_eq!(
        saved.modules_to_save,
        Some(vec!["classifier".to_string(), "score".to_string()])
    );
}
