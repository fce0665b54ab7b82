//! LoRA on the toy model against Hugging Face PEFT's own outputs
//! (`tests/fixtures/lora/make_fixtures.py`, peft 0.21.2): for every case, our outputs with the
//! adapter active, disabled, merged and merged-and-unloaded equal PEFT's to 1e-5 (f32), our
//! targeted modules, ranks and scalings equal PEFT's, and our parameter-count line is PEFT's.

mod common;

use burn::tensor::Tensor;
use common::toy::{Toy, load_peft_tensors};
use common::{B, Fixture, check_close, ok, read_json};
use peft::core::check::Failures;
use peft::core::{AdapterHost, LoraConfig, PeftModel};
use serde_json::Value;

const TOL: f32 = 1e-5;

struct Case {
    name: String,
    json: Value,
}

fn cases() -> Vec<Case> {
    let meta = read_json("lora/cases.json");
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            json: c.clone(),
        })
        .collect()
}

/// The adapters a case activates, in PEFT's order.
fn active(case: &Case) -> Vec<String> {
    case.json["active"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Builds the PEFT model of a case from the configs PEFT serialised, with PEFT's tensors.
/// A case that cannot be built is recorded in `fails` and gives `None`.
fn build(case: &Case, fx: &Fixture, fails: &mut Failures) -> Option<PeftModel<B, Toy<B>>> {
    let device = Default::default();
    let n = &case.name;
    let adapters = case.json["adapters"].as_array().unwrap();
    let mut peft: Option<PeftModel<B, Toy<B>>> = None;
    for a in adapters {
        let name = a["name"].as_str().unwrap();
        let config: LoraConfig = ok(
            fails,
            serde_json::from_value(a["config"].clone()),
            &format!("{n}: PEFT's config of {name} does not parse"),
        )?;
        let what = format!("{n}: adding adapter {name}");
        match peft.as_mut() {
            None => {
                peft = Some(ok(
                    fails,
                    PeftModel::new(Toy::from_fixture(fx, &device), config, name),
                    &what,
                )?)
            }
            Some(p) => ok(fails, p.add_adapter(name, config), &what)?,
        }
        let p = peft.as_mut().unwrap();
        let keys = a["keys"].as_array().unwrap().len();
        let set = load_peft_tensors(p, fx, &format!("{n}.{name}."), name, &device);
        if set != keys {
            fails.fail(format!(
                "{n}: every PEFT tensor has a place: {set} set, {keys} in PEFT's state dict"
            ));
        }
    }
    let mut peft = peft.unwrap();
    let active = active(case);
    let active: Vec<&str> = active.iter().map(String::as_str).collect();
    ok(
        fails,
        peft.set_adapter(&active),
        &format!("{n}: set_adapter({active:?})"),
    )?;
    Some(peft)
}

#[test]
fn outputs_match_peft_for_every_case() {
    let fx = Fixture::load("lora/toy.safetensors");
    let device = Default::default();
    let x = fx.get::<B, 2>("input.x", &device);
    let all = cases();
    assert!(all.len() >= 14);
    let mut fails = Failures::new();
    for case in &all {
        let n = &case.name;
        let Some(mut peft) = build(case, &fx, &mut fails) else {
            continue;
        };
        let y = peft.base_model.forward(x.clone());
        check_close(
            &mut fails,
            y,
            fx.get(&format!("{n}.out.y"), &device),
            TOL,
            &format!("{n}: adapted output"),
        );

        peft.disable_adapters();
        let y = peft.base_model.forward(x.clone());
        check_close(
            &mut fails,
            y,
            fx.get(&format!("{n}.out.y_disabled"), &device),
            TOL,
            &format!("{n}: disabled"),
        );
        peft.enable_adapters();

        let merged = peft.merge_adapter(None, true);
        if ok(&mut fails, merged, &format!("{n}: merge_adapter")).is_some() {
            let y = peft.base_model.forward(x.clone());
            check_close(
                &mut fails,
                y,
                fx.get(&format!("{n}.out.y_merged"), &device),
                TOL,
                &format!("{n}: merged"),
            );
            let w = peft.base_model.layer[0].q.weight.val().transpose();
            check_close(
                &mut fails,
                w,
                fx.get(&format!("{n}.out.merged_q0_weight"), &device),
                TOL,
                &format!("{n}: merged weight"),
            );
        }
        peft.unmerge_adapter();

        if fx.has(&format!("{n}.out.y_other")) {
            let other = peft.set_adapter(&["other"]);
            if ok(&mut fails, other, &format!("{n}: set_adapter([other])")).is_some() {
                let y = peft.base_model.forward(x.clone());
                check_close(
                    &mut fails,
                    y,
                    fx.get(&format!("{n}.out.y_other"), &device),
                    TOL,
                    &format!("{n}: other only"),
                );
            }
            let active = active(case);
            let active: Vec<&str> = active.iter().map(String::as_str).collect();
            let back = peft.set_adapter(&active);
            if ok(&mut fails, back, &format!("{n}: set_adapter back")).is_none() {
                continue;
            }
        }

        let unloaded = peft.merge_and_unload(true);
        let Some(plain) = ok(&mut fails, unloaded, &format!("{n}: merge_and_unload")) else {
            continue;
        };
        let y = plain.forward(x.clone());
        check_close(
            &mut fails,
            y,
            fx.get(&format!("{n}.out.y_merge_and_unload"), &device),
            TOL,
            &format!("{n}: merge_and_unload"),
        );
        check_unloaded(&plain, n, &mut fails);
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

/// After merge-and-unload no layer carries adapters.
fn check_unloaded(plain: &Toy<B>, case: &str, fails: &mut Failures) {
    plain.visit_linears(&mut |p, l| {
        if !(l.lora.is_empty() && l.modules_to_save.is_empty() && l.backup.is_none()) {
            fails.fail(format!("{case}: {p} still adapted"));
        }
    });
}

#[test]
fn targets_ranks_scalings_and_counts_match_peft() {
    let fx = Fixture::load("lora/toy.safetensors");
    let mut fails = Failures::new();
    for case in &cases() {
        let n = &case.name;
        let Some(peft) = build(case, &fx, &mut fails) else {
            continue;
        };
        for a in case.json["adapters"].as_array().unwrap() {
            let name = a["name"].as_str().unwrap();
            let mut theirs: Vec<String> = a["targeted"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            theirs.sort();
            let mut ours = peft.targeted_modules(name).to_vec();
            ours.sort();
            if ours != theirs {
                fails.fail(format!(
                    "{n}: targeted modules of {name}: ours {ours:?}, PEFT {theirs:?}"
                ));
            }
            peft.base_model.visit_linears(&mut |path, layer| {
                let Some(l) = a["layers"].get(path) else {
                    return;
                };
                let Some(ad) = layer.adapter(name) else {
                    fails.fail(format!("{n}: {path} has no adapter {name}"));
                    return;
                };
                let r = l["r"].as_u64().unwrap();
                if ad.r as u64 != r {
                    fails.fail(format!("{n}: r of {path}: {} vs {r}", ad.r));
                }
                let s = l["scaling"].as_f64().unwrap();
                let close = (ad.scaling - s).abs() < 1e-12;
                if !close {
                    fails.fail(format!("{n}: scaling of {path}: {} vs {s}", ad.scaling));
                }
            });
        }
        let counts = peft.parameter_counts();
        let trainable = case.json["trainable"].as_u64().unwrap();
        if counts.trainable as u64 != trainable {
            fails.fail(format!(
                "{n}: trainable: {} vs {trainable}",
                counts.trainable
            ));
        }
        let all = case.json["all"].as_u64().unwrap();
        if counts.all as u64 != all {
            fails.fail(format!("{n}: all: {} vs {all}", counts.all));
        }
        let line = peft.trainable_parameters_line();
        let theirs = case.json["line"].as_str().unwrap();
        if line != theirs {
            fails.fail(format!("{n}: line {line:?} vs {theirs:?}"));
        }
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

#[test]
fn peft_configs_round_trip_unchanged() {
    // Every config PEFT wrote parses, and serialises back to the same JSON value: unknown
    // fields are kept, numbers keep their form.
    let mut fails = Failures::new();
    for case in &cases() {
        for a in case.json["adapters"].as_array().unwrap() {
            let theirs = a["config"].clone();
            let what = format!("{}: config round trip", case.name);
            let parsed = serde_json::from_value::<LoraConfig>(theirs.clone());
            let Some(config) = ok(&mut fails, parsed, &what) else {
                continue;
            };
            let ours: Value = serde_json::from_str(&config.to_json()).unwrap();
            if ours != theirs {
                fails.fail(format!("{what}: ours {ours}, PEFT's {theirs}"));
            }
        }
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}

/// The collector behind the tests above reports every failing case, not only the first: two
/// wrong cases (a value just outside the tolerance, a wrong shape) and an all-NaN output are all
/// named, and the case within the tolerance is not.
#[test]
fn every_failing_case_is_reported() {
    let device = Default::default();
    let t = |v: &[f32], shape: [usize; 2]| {
        Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(v.to_vec(), shape), &device)
    };
    let reference = [1.0f32, -2.0, 0.5];
    let mut fails = Failures::new();
    let close = [1.0 + 0.5 * TOL, -2.0, 0.5];
    let d = check_close(
        &mut fails,
        t(&close, [1, 3]),
        t(&reference, [1, 3]),
        TOL,
        "case within tol",
    );
    assert!(d <= TOL, "{d}");
    let off = [1.0, -2.0, 0.5 + 2.0 * TOL];
    let d = check_close(
        &mut fails,
        t(&off, [1, 3]),
        t(&reference, [1, 3]),
        TOL,
        "case just outside tol",
    );
    assert!(d > TOL, "{d}");
    let d = check_close(
        &mut fails,
        t(&reference, [3, 1]),
        t(&reference, [1, 3]),
        TOL,
        "case with the wrong shape",
    );
    assert_eq!(d, f32::INFINITY);
    // An all-NaN output: a maximum folded with f32::max would call it equal to anything.
    let d = check_close(
        &mut fails,
        t(&[f32::NAN; 3], [1, 3]),
        t(&reference, [1, 3]),
        TOL,
        "case all NaN",
    );
    assert_eq!(d, f32::INFINITY);
    let err = fails.finish().unwrap_err();
    assert!(err.starts_with("3 of 4 checks failed"), "{err}");
    for named in [
        "case just outside tol: max",
        "case with the wrong shape: shape [3, 1] vs [1, 3]",
        "case all NaN: max |ours - reference| = inf",
    ] {
        assert!(err.contains(named), "{named:?} missing from:\n{err}");
    }
    assert!(!err.contains("case within tol"), "{err}");
}
