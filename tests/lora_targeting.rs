//! Target matching against PEFT's decisions on the real module names of tiny transformers T5
//! (encoder 2 / decoder 3 blocks, gated-gelu) and BERT (`BertForSequenceClassification`)
//! models (`tests/fixtures/lora/targeting.json`): for every config, the adapted modules, their
//! ranks and scalings, the `modules_to_save` copies, or the refusal, are PEFT's.

mod common;

use burn::module::Module;
use burn::tensor::backend::Backend;
use common::{B, read_json};
use peft::core::check::Failures;
use peft::core::{AdaptedLinear, AdapterHost, LoraConfig, PeftError, PeftModel, TaskType};
use serde_json::Value;

/// A model that is only a list of named linear layers (2 x 2): enough to exercise targeting.
#[derive(Module, Debug)]
struct NamedLinears<B: Backend> {
    layers: Vec<AdaptedLinear<B>>,
    names: Vec<String>,
    model_type: String,
}

impl<B: Backend> AdapterHost<B> for NamedLinears<B> {
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) {
        for (n, l) in self.names.iter().zip(&self.layers) {
            f(n, l);
        }
    }
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) {
        for (n, l) in self.names.iter().zip(self.layers.iter_mut()) {
            f(n, l);
        }
    }
    fn model_type(&self) -> Option<&str> {
        Some(&self.model_type)
    }
    /// What peft-models' T5 and BERT report: the LM head, or the classifier for SEQ_CLS.
    fn output_heads(&self, task: Option<TaskType>) -> Vec<String> {
        match (self.model_type.as_str(), task) {
            ("t5", _) => vec!["lm_head".into()],
            ("bert", Some(TaskType::SeqCls)) => vec!["classifier".into()],
            _ => vec![],
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn targeting_matches_peft() {
    let fx = read_json("lora/targeting.json");
    let device = Default::default();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    let mut fails = Failures::new();
    let mut errors_seen = 0;
    for (i, case) in cases.iter().enumerate() {
        let model_key = case["model"].as_str().unwrap();
        let info = &fx["models"][model_key];
        let names = strings(&info["linears"]);
        let model = NamedLinears::<B> {
            layers: names
                .iter()
                .map(|_| AdaptedLinear::new(2, 2, true, &device))
                .collect(),
            names: names.clone(),
            model_type: info["model_type"].as_str().unwrap().to_string(),
        };
        let what = format!("case {i} ({model_key}, {})", case["config"]);
        let config: LoraConfig = match serde_json::from_value(case["config"].clone()) {
            Ok(c) => c,
            Err(e) => {
                fails.fail(format!("{what}: config does not parse: {e}"));
                continue;
            }
        };
        match PeftModel::new(model, config, "default") {
            Ok(peft) => {
                if case.get("error").is_some() {
                    fails.fail(format!("{what}: PEFT refused it: {}", case["error"]));
                    continue;
                }
                let mut ours = peft.targeted_modules("default").to_vec();
                ours.sort();
                let theirs = strings(&case["targeted"]);
                if ours != theirs {
                    fails.fail(format!("{what}: targeted: ours {ours:?}, PEFT {theirs:?}"));
                }
                let mut saved = Vec::new();
                peft.base_model.visit_linears(&mut |p, l| {
                    if l.saved_copy("default").is_some() {
                        saved.push(p.to_string());
                    }
                    if let Some(a) = l.adapter("default") {
                        let theirs = &case["layers"][p];
                        match theirs["r"].as_u64() {
                            Some(r) if a.r as u64 == r => {}
                            r => fails.fail(format!("{what}: r of {p}: {} vs {r:?}", a.r)),
                        }
                        let close = theirs["scaling"]
                            .as_f64()
                            .is_some_and(|s| (a.scaling - s).abs() < 1e-12);
                        if !close {
                            fails.fail(format!(
                                "{what}: scaling of {p}: {} vs {}",
                                a.scaling, theirs["scaling"]
                            ));
                        }
                    }
                });
                saved.sort();
                let theirs = strings(&case["modules_to_save"]);
                if saved != theirs {
                    fails.fail(format!(
                        "{what}: modules_to_save: ours {saved:?}, PEFT {theirs:?}"
                    ));
                }
                let Some(cfg) = peft.lora_config("default") else {
                    fails.fail(format!("{what}: no config kept for `default`"));
                    continue;
                };
                let theirs = &case["saved_config_modules_to_save"];
                let same = if theirs.is_null() {
                    cfg.modules_to_save.is_none()
                } else {
                    cfg.modules_to_save.as_ref() == Some(&strings(theirs))
                };
                if !same {
                    fails.fail(format!(
                        "{what}: saved modules_to_save: ours {:?}, PEFT {theirs}",
                        cfg.modules_to_save
                    ));
                }
            }
            Err(e) => {
                let Some(theirs) = case.get("error") else {
                    fails.fail(format!("{what}: we refused what PEFT accepted: {e}"));
                    continue;
                };
                errors_seen += 1;
                if !matches!(e, PeftError::NoTargetMatched { .. }) {
                    fails.fail(format!("{what}: not NoTargetMatched: {e}"));
                }
                // Our message names what was asked and what the model has.
                let msg = e.to_string();
                if !msg.contains("not found in the base model") {
                    fails.fail(format!("{what}: {msg}"));
                }
                if !msg.contains(&names[0]) {
                    fails.fail(format!("{what}: {msg} lists the model's layers"));
                }
                if !theirs.as_str().unwrap().contains("Error") {
                    fails.fail(format!("{what}: PEFT's error {theirs} names no Error"));
                }
            }
        }
    }
    if errors_seen < 4 {
        fails.fail(format!(
            "the fixture's refusals were all exercised: only {errors_seen} seen"
        ));
    }
    if let Err(e) = fails.finish() {
        panic!("{e}")
    }
}
