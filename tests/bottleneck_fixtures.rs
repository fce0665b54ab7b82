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
use common::{AB, B, Fixture, check_close, fixture_path, ok, read_json};
use peft::core::check::Failures;
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

/// Panics listing every recorded failure, if any.
fn finish(fails: Failures) {
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

#[test]
fn bert_bottleneck_adapters_match_adapterhub() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    let mut fails = Failures::new();
    let f = &mut fails;
    check_close(f, bert_out(&bert()), fx.get("base", &device), TOL, "base");
    for (dir, key) in [
        ("bert_houlsby", "houlsby"),
        ("bert_houlsby_bin", "houlsby"),
        ("bert_pfeiffer", "pfeiffer"),
        ("bert_variant", "variant"),
        ("bert_variant2", "variant2"),
    ] {
        let loaded = from_pretrained(bert(), &fixture_path(&format!("bottleneck/{dir}")), key);
        let Some((peft, report)) = ok(f, loaded, dir) else {
            continue;
        };
        if !report.unused.is_empty() {
            f.fail(format!("{dir}: unused {:?}", report.unused));
        }
        check_close(
            f,
            bert_out(&peft.base_model),
            fx.get(key, &device),
            TOL,
            dir,
        );
    }
    finish(fails);
}

#[test]
fn t5_bottleneck_adapters_match_adapterhub() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/t5_outputs.safetensors");
    let mut fails = Failures::new();
    let f = &mut fails;
    let (logits, enc) = t5_out(&t5("bottleneck/t5_base"));
    check_close(f, logits, fx.get("base", &device), TOL, "base logits");
    check_close(f, enc, fx.get("base.encoder", &device), TOL, "base encoder");
    for key in ["houlsby", "pfeiffer", "cross", "variant"] {
        let dir = fixture_path(&format!("bottleneck/t5_{key}"));
        let loaded = from_pretrained(t5("bottleneck/t5_base"), &dir, key);
        let Some((peft, report)) = ok(f, loaded, key) else {
            continue;
        };
        if !report.unused.is_empty() {
            f.fail(format!("{key}: unused {:?}", report.unused));
        }
        let (logits, enc) = t5_out(&peft.base_model);
        let what = format!("{key} logits");
        check_close(f, logits, fx.get(key, &device), TOL, &what);
        check_close(
            f,
            enc,
            fx.get(&format!("{key}.encoder"), &device),
            TOL,
            &format!("{key} encoder"),
        );
    }
    finish(fails);
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
    let mut fails = Failures::new();
    let f = &mut fails;
    for key in ["pfeiffer", "houlsby", "variant", "pfeiffer"] {
        let what = format!("active {key}");
        if ok(f, peft.set_adapter(&[key]), &what).is_none() {
            continue;
        }
        check_close(
            f,
            bert_out(&peft.base_model),
            fx.get(key, &device),
            TOL,
            &what,
        );
    }
    peft.disable_adapters();
    check_close(
        f,
        bert_out(&peft.base_model),
        fx.get("base", &device),
        TOL,
        "disabled",
    );
    peft.enable_adapters();
    match peft.merge_adapter(None, true) {
        Ok(()) => f.fail("merging a bottleneck adapter was accepted"),
        Err(e) if !e.to_string().contains("bottleneck") => f.fail(format!("merge: {e}")),
        Err(_) => {}
    }
    peft.delete_adapter("pfeiffer").unwrap();
    peft.set_adapter(&["houlsby"]).unwrap();
    check_close(
        f,
        bert_out(&peft.base_model),
        fx.get("houlsby", &device),
        TOL,
        "after delete",
    );
    let base = peft.unload();
    if common::to_vec(base.layer[0].query.weight.val()) != before {
        f.fail("unload: the base weight changed");
    }
    check_close(f, bert_out(&base), fx.get("base", &device), TOL, "unloaded");
    finish(fails);
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
    let mut fails = Failures::new();
    let f = &mut fails;
    for k in &a {
        if theirs.get_f32(k).unwrap() != ours.get_f32(k).unwrap() {
            f.fail(format!("{k} does not round-trip bit for bit"));
        }
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
    check_close(
        f,
        t5_out(&reloaded.base_model).0,
        fx.get("variant", &Default::default()),
        TOL,
        "reloaded",
    );
    finish(fails);
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

/// Records a mismatch of trainable or total parameter counts against AdapterHub's.
fn compare_counts(
    f: &mut Failures,
    what: &str,
    c: peft::core::ParamCounts,
    theirs: &serde_json::Value,
) {
    let trainable = theirs["trainable"].as_u64().unwrap();
    let total = theirs["total"].as_u64().unwrap();
    if c.trainable as u64 != trainable {
        f.fail(format!("{what}: trainable {} vs {trainable}", c.trainable));
    }
    if c.all as u64 != total {
        f.fail(format!("{what}: all {} vs {total}", c.all));
    }
}

#[test]
fn bottleneck_counts_match_adapterhub() {
    let counts = read_json("bottleneck/counts.json");
    let device = Default::default();
    let large = BertConfig::preset_by_name("bert-large-uncased").unwrap();
    let mut fails = Failures::new();
    let f = &mut fails;
    for (name, config) in [
        ("houlsby", BnConfig::houlsby()),
        ("pfeiffer", BnConfig::pfeiffer()),
    ] {
        let model = BertModel::<B>::new(&large, true, &device).unwrap();
        let Some(peft) = ok(f, PeftModel::new(model, config, name), name) else {
            continue;
        };
        compare_counts(
            f,
            name,
            peft.parameter_counts(),
            &counts["bert_large"][name],
        );
    }
    let model = BertModel::<B>::new(&large, true, &device).unwrap();
    if let Some(peft) = ok(f, PeftModel::new(model, BnConfig::houlsby(), "h"), "h") {
        let line = peft.trainable_parameters_line();
        let theirs = "trainable params: 6,343,680 || all params: 341,485,568 || trainable%: 1.8577";
        if line != theirs {
            f.fail(format!("bert-large houlsby: {line:?} vs {theirs:?}"));
        }
    }
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
            let what = format!("{model} {key}");
            let c = if model == "bert_tiny" {
                let Some((mut p, _)) = ok(f, from_pretrained(bert(), &dir, key), &what) else {
                    continue;
                };
                p.set_frozen(key, false).unwrap();
                p.parameter_counts()
            } else {
                let loaded = from_pretrained(t5("bottleneck/t5_base"), &dir, key);
                let Some((mut p, _)) = ok(f, loaded, &what) else {
                    continue;
                };
                p.set_frozen(key, false).unwrap();
                p.parameter_counts()
            };
            compare_counts(f, &what, c, &counts[model][key]);
        }
    }
    finish(fails);
}

#[test]
fn ia3_matches_peft_with_merge() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/ia3_outputs.safetensors");
    let (mut peft, report) =
        from_pretrained(bert(), &fixture_path("bottleneck/ia3_bert"), "default").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    let mut fails = Failures::new();
    let f = &mut fails;
    check_close(
        f,
        bert_out(&peft.base_model),
        fx.get("bert", &device),
        TOL,
        "ia3 bert",
    );
    if ok(f, peft.merge_adapter(None, true), "ia3 bert merge").is_some() {
        check_close(
            f,
            bert_out(&peft.base_model),
            fx.get("bert.merged", &device),
            TOL,
            "ia3 bert merged",
        );
    }
    peft.unmerge_adapter();
    check_close(
        f,
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
        let loaded = from_pretrained(t5(model), &fixture_path(dir), "default");
        let Some((peft, report)) = ok(f, loaded, dir) else {
            continue;
        };
        if !report.unused.is_empty() {
            f.fail(format!("{dir}: {report:?}"));
        }
        check_close(
            f,
            t5_out(&peft.base_model).0,
            fx.get(key, &device),
            TOL,
            dir,
        );
        let what = format!("{dir} merged");
        let Some(merged) = ok(f, peft.merge_and_unload(true), &what) else {
            continue;
        };
        check_close(
            f,
            t5_out(&merged).0,
            fx.get(&format!("{key}.merged"), &device),
            TOL,
            &what,
        );
    }
    let (base_logits, _) = t5_out(&t5("bottleneck/mt5_base"));
    check_close(f, base_logits, fx.get("mt5.base", &device), TOL, "mt5 base");
    finish(fails);
}

#[test]
fn ia3_counts_and_saved_files_match_peft() {
    let counts = read_json("bottleneck/counts.json");
    let mut fails = Failures::new();
    let f = &mut fails;
    for (model, cfg_model, key) in [
        ("bert", None, "ia3_bert"),
        ("t5", Some("bottleneck/t5_base"), "ia3_t5"),
        ("mt5", Some("bottleneck/mt5_base"), "ia3_mt5"),
    ] {
        let c = match cfg_model {
            None => ok(
                f,
                PeftModel::new(bert(), Ia3Config::default(), "default"),
                model,
            )
            .map(|p| p.parameter_counts()),
            Some(m) => ok(
                f,
                PeftModel::new(t5(m), Ia3Config::default(), "default"),
                model,
            )
            .map(|p| p.parameter_counts()),
        };
        let Some(c) = c else {
            continue;
        };
        let theirs = &counts[key];
        let (trainable, total) = (
            theirs["trainable"].as_u64().unwrap(),
            theirs["total"].as_u64().unwrap(),
        );
        if c.trainable as u64 != trainable {
            f.fail(format!("{model}: trainable {} vs {trainable}", c.trainable));
        }
        if c.all as u64 != total {
            f.fail(format!("{model}: all {} vs {total}", c.all));
        }
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
        if theirs.get_f32(k).unwrap() != ours.get_f32(k).unwrap() {
            f.fail(format!("{k} differs from PEFT's"));
        }
    }
    let cfg = peft::io::read_adapter_config(&dir).unwrap();
    let orig = peft::io::read_adapter_config(&src).unwrap();
    if cfg != orig {
        f.fail(format!("saved config {cfg:?} vs PEFT's {orig:?}"));
    }
    finish(fails);
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
    let mut fails = Failures::new();
    let f = &mut fails;
    // Reduction factor 16 on hidden 32: bottleneck 2, 162 parameters a site, 6 sites.
    if counts.trainable != 972 {
        f.fail(format!("only `a` trains, 972 parameters: {counts:?}"));
    }
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
            if g != (a.name == "a") {
                f.fail(format!("{} {}: gradient {g}", site.path, a.name));
            }
            with_grad += usize::from(g);
        }
    });
    if with_grad != 6 {
        f.fail(format!(
            "houlsby: two sites in each of 3 layers, {with_grad} with gradients"
        ));
    }
    peft.base_model.visit_linears(&mut |path, l| {
        if grads
            .get::<burn::backend::NdArray, 2>(l.weight.id)
            .is_some()
        {
            f.fail(format!("{path}: the base weight has a gradient"));
        }
        for a in &l.ia3 {
            if grads.get::<burn::backend::NdArray, 1>(a.ia3_l.id).is_some() {
                f.fail(format!("{path} ia3: has a gradient"));
            }
        }
    });
    // 2 weights + 2 biases per site, 6 sites.
    if grads.len() != 24 {
        f.fail(format!("{} gradients, expected 24", grads.len()));
    }
    finish(fails);
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
    // Every case runs; the errors that miss what they should name are reported together.
    let mut fails = Failures::new();
    let mut expect = |what: &str, err: String, named: bool| {
        if !named {
            fails.fail(format!("{what}: {err}"));
        }
    };
    let err = case("rf", &|c| c["config"]["reduction_factor"] = 2.into());
    let named = err.contains("adapter.safetensors")
        && err.contains("encoder.layer.0.attention.output.adapters.houlsby.adapter_down.0.weight")
        && err.contains("expected [16, 32], found [8, 32]");
    expect("reduction_factor", err, named);
    let err = case("ln", &|c| c["config"]["ln_after"] = true.into());
    let named = err.contains("missing") && err.contains("adapter_norm_after.weight");
    expect("ln_after", err, named);
    let err = case("arch", &|c| {
        c["config"]["architecture"] = "prefix_tuning".into()
    });
    let named = err.contains("adapter_config.json") && err.contains("prefix_tuning");
    expect("architecture", err, named);
    let err = case("gating", &|c| c["config"]["use_gating"] = true.into());
    let named = err.contains("use_gating");
    expect("use_gating", err, named);
    let err = case("hidden", &|c| c["hidden_size"] = 64.into());
    let named = err.contains("hidden_size mismatch");
    expect("hidden_size", err, named);

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
    let named = err.contains("adapter.safetensors");
    expect("truncated weights", err, named);
    std::fs::write(d.join("adapter_config.json"), "{\"config\": {").unwrap();
    let err = from_pretrained(bert(), &d, "x")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let named = err.contains("adapter_config.json: invalid JSON");
    expect("invalid JSON", err, named);
    finish(fails);
}

#[test]
fn zero_up_projection_leaves_outputs_unchanged_and_inits_have_their_statistics() {
    let device = Default::default();
    let fx = Fixture::load("bottleneck/bert_outputs.safetensors");
    let tx = Fixture::load("bottleneck/t5_outputs.safetensors");
    let mut fails = Failures::new();
    let f = &mut fails;
    for (arch, preset) in [
        ("houlsby", BnConfig::houlsby()),
        ("pfeiffer", BnConfig::pfeiffer()),
    ] {
        // mam_adapter: kaiming-uniform down, zero up: the adapter starts as a no-op.
        let mam = BnConfig {
            init_weights: "mam_adapter".into(),
            reduction_factor: peft::core::bottleneck::ReductionFactor::One(4.0),
            ..preset.clone()
        };
        let what = format!("bert mam ({arch})");
        if let Some(peft) = ok(f, PeftModel::new(bert(), mam.clone(), "a"), &what) {
            let base = fx.get("base", &device);
            check_close(f, bert_out(&peft.base_model), base, TOL, &what);
        }
        let what = format!("t5 mam ({arch})");
        if let Some(peft) = ok(f, PeftModel::new(t5("bottleneck/t5_base"), mam, "a"), &what) {
            let base = tx.get("base", &device);
            check_close(f, t5_out(&peft.base_model).0, base, TOL, &what);
        }
    }
    // houlsby init: N(0, 0.01) truncated at +-0.02; bert init: N(0, 0.02), zero biases.
    let big = BertConfig::preset_by_name("bert-base-uncased").unwrap();
    let model = BertModel::<B>::new(&big, false, &device).unwrap();
    for (init, std, bound) in [("houlsby", 0.01f32, Some(0.02f32)), ("bert", 0.02, None)] {
        let c = BnConfig {
            init_weights: init.into(),
            ..BnConfig::pfeiffer()
        };
        let Some(peft) = ok(f, PeftModel::new(model.clone(), c, "a"), init) else {
            continue;
        };
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
        let sd_ok = (sd - want).abs() < 0.05 * want;
        if !sd_ok {
            f.fail(format!("{init}: sd {sd} vs {want}"));
        }
        if let Some(b) = bound
            && !w.iter().all(|x| x.abs() <= b)
        {
            f.fail(format!("{init}: not inside +-{b}"));
        }
        if !common::to_vec(a.up_bias.val()).iter().all(|x| *x == 0.0) {
            f.fail(format!("{init}: up bias not zero"));
        }
    }
    finish(fails);
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
