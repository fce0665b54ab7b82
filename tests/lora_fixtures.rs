//! LoRA on the toy model against Hugging Face PEFT's own outputs
//! (`tests/fixtures/lora/make_fixtures.py`, peft 0.21.2): for every case, our outputs with the
//! adapter active, disabled, merged and merged-and-unloaded equal PEFT's to 1e-5 (f32), our
//! targeted modules, ranks and scalings equal PEFT's, and our parameter-count line is PEFT's.

mod common;

use common::toy::{Toy, load_peft_tensors};
use common::{B, Fixture, assert_close, read_json};
use peft::core::{LoraConfig, PeftModel};
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

/// Builds the PEFT model of a case from the configs PEFT serialised, with PEFT's tensors.
fn build(case: &Case, fx: &Fixture) -> PeftModel<B, Toy<B>> {
    let device = Default::default();
    let adapters = case.json["adapters"].as_array().unwrap();
    let mut peft: Option<PeftModel<B, Toy<B>>> = None;
    for a in adapters {
        let name = a["name"].as_str().unwrap();
        let config: LoraConfig = serde_json::from_value(a["config"].clone())
            .unwrap_or_else(|e| panic!("{}: PEFT's config does not parse: {e}", case.name));
        match peft.as_mut() {
            None => {
                peft = Some(PeftModel::new(Toy::from_fixture(fx, &device), config, name).unwrap())
            }
            Some(p) => p.add_adapter(name, config).unwrap(),
        }
        let p = peft.as_mut().unwrap();
        let keys = a["keys"].as_array().unwrap().len();
        let set = load_peft_tensors(p, fx, &format!("{}.{name}.", case.name), name, &device);
        assert_eq!(set, keys, "{}: every PEFT tensor has a place", case.name);
    }
    let mut peft = peft.unwrap();
    let active: Vec<&str> = case.json["active"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    peft.set_adapter(&active).unwrap();
    peft
}

#[test]
fn outputs_match_peft_for_every_case() {
    let fx = Fixture::load("lora/toy.safetensors");
    let device = Default::default();
    let x = fx.get::<B, 2>("input.x", &device);
    let all = cases();
    assert!(all.len() >= 14);
    for case in &all {
        let n = &case.name;
        let mut peft = build(case, &fx);
        let y = peft.base_model.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{n}.out.y"), &device),
            TOL,
            &format!("{n}: adapted output"),
        );

        peft.disable_adapters();
        let y = peft.base_model.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{n}.out.y_disabled"), &device),
            TOL,
            &format!("{n}: disabled"),
        );
        peft.enable_adapters();

        peft.merge_adapter(None, true).unwrap();
        let y = peft.base_model.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{n}.out.y_merged"), &device),
            TOL,
            &format!("{n}: merged"),
        );
        let w = peft.base_model.layer[0].q.weight.val().transpose();
        assert_close(
            w,
            fx.get(&format!("{n}.out.merged_q0_weight"), &device),
            TOL,
            &format!("{n}: merged weight"),
        );
        peft.unmerge_adapter();

        if fx.has(&format!("{n}.out.y_other")) {
            peft.set_adapter(&["other"]).unwrap();
            let y = peft.base_model.forward(x.clone());
            assert_close(
                y,
                fx.get(&format!("{n}.out.y_other"), &device),
                TOL,
                &format!("{n}: other only"),
            );
            let active: Vec<String> = case.json["active"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let active: Vec<&str> = active.iter().map(String::as_str).collect();
            peft.set_adapter(&active).unwrap();
        }

        let plain = peft.merge_and_unload(true).unwrap();
        let y = plain.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{n}.out.y_merge_and_unload"), &device),
            TOL,
            &format!("{n}: merge_and_unload"),
        );
        plain.visit_linears_probe(n);
    }
}

/// After merge-and-unload no layer carries adapters.
trait Probe {
    fn visit_linears_probe(&self, case: &str);
}

impl Probe for Toy<B> {
    fn visit_linears_probe(&self, case: &str) {
        use peft::core::AdapterHost;
        self.visit_linears(&mut |p, l| {
            assert!(
                l.lora.is_empty() && l.modules_to_save.is_empty() && l.backup.is_none(),
                "{case}: {p} still adapted"
            );
        });
    }
}

#[test]
fn targets_ranks_scalings_and_counts_match_peft() {
    let fx = Fixture::load("lora/toy.safetensors");
    for case in &cases() {
        let peft = build(case, &fx);
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
            assert_eq!(ours, theirs, "{}: targeted modules of {name}", case.name);
            peft::core::AdapterHost::visit_linears(&peft.base_model, &mut |path, layer| {
                if let Some(l) = a["layers"].get(path) {
                    let ad = layer.adapter(name).unwrap();
                    assert_eq!(
                        ad.r as u64,
                        l["r"].as_u64().unwrap(),
                        "{}: r of {path}",
                        case.name
                    );
                    let s = l["scaling"].as_f64().unwrap();
                    assert!(
                        (ad.scaling - s).abs() < 1e-12,
                        "{}: scaling of {path}: {} vs {s}",
                        case.name,
                        ad.scaling
                    );
                }
            });
        }
        let counts = peft.parameter_counts();
        assert_eq!(
            counts.trainable as u64,
            case.json["trainable"].as_u64().unwrap(),
            "{}: trainable",
            case.name
        );
        assert_eq!(
            counts.all as u64,
            case.json["all"].as_u64().unwrap(),
            "{}: all",
            case.name
        );
        assert_eq!(
            peft.trainable_parameters_line(),
            case.json["line"].as_str().unwrap(),
            "{}",
            case.name
        );
    }
}

#[test]
fn peft_configs_round_trip_unchanged() {
    // Every config PEFT wrote parses, and serialises back to the same JSON value: unknown
    // fields are kept, numbers keep their form.
    for case in &cases() {
        for a in case.json["adapters"].as_array().unwrap() {
            let theirs = a["config"].clone();
            let config: LoraConfig = serde_json::from_value(theirs.clone()).unwrap();
            let ours: Value = serde_json::from_str(&config.to_json()).unwrap();
            assert_eq!(ours, theirs, "{}: config round trip", case.name);
        }
    }
}
