//! Target matching against PEFT's decisions on the real module names of tiny transformers T5
//! (encoder 2 / decoder 3 blocks, gated-gelu) and BERT (`BertForSequenceClassification`)
//! models (`tests/fixtures/lora/targeting.json`): for every config, the adapted modules, their
//! ranks and scalings, the `modules_to_save` copies, or the refusal, are PEFT's.

mod common;

use burn::module::Module;
use burn::tensor::backend::Backend;
use common::{B, read_json};
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
        let config: LoraConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let what = format!("case {i} ({model_key}, {})", case["config"]);
        match PeftModel::new(model, config, "default") {
            Ok(peft) => {
                assert!(
                    case.get("error").is_none(),
                    "{what}: PEFT refused it: {}",
                    case["error"]
                );
                let mut ours = peft.targeted_modules("default").to_vec();
                ours.sort();
                assert_eq!(ours, strings(&case["targeted"]), "{what}: targeted");
                let mut saved = Vec::new();
                peft.base_model.visit_linears(&mut |p, l| {
                    if l.saved_copy("default").is_some() {
                        saved.push(p.to_string());
                    }
                    if let Some(a) = l.adapter("default") {
                        let theirs = &case["layers"][p];
                        assert_eq!(
                            a.r as u64,
                            theirs["r"].as_u64().unwrap(),
                            "{what}: r of {p}"
                        );
                        let s = theirs["scaling"].as_f64().unwrap();
                        assert!((a.scaling - s).abs() < 1e-12, "{what}: scaling of {p}");
                    }
                });
                saved.sort();
                assert_eq!(
                    saved,
                    strings(&case["modules_to_save"]),
                    "{what}: modules_to_save"
                );
                let cfg = peft.lora_config("default").unwrap();
                let theirs = &case["saved_config_modules_to_save"];
                if theirs.is_null() {
                    assert!(cfg.modules_to_save.is_none(), "{what}");
                } else {
                    assert_eq!(
                        cfg.modules_to_save.clone().unwrap(),
                        strings(theirs),
                        "{what}"
                    );
                }
            }
            Err(e) => {
                let theirs = case
                    .get("error")
                    .unwrap_or_else(|| panic!("{what}: we refused what PEFT accepted: {e}"));
                errors_seen += 1;
                assert!(
                    matches!(e, PeftError::NoTargetMatched { .. }),
                    "{what}: {e}"
                );
                // Our message names what was asked and what the model has.
                let msg = e.to_string();
                assert!(msg.contains("not found in the base model"), "{msg}");
                assert!(msg.contains(&names[0]), "{msg} lists the model's layers");
                assert!(theirs.as_str().unwrap().contains("Error"));
            }
        }
    }
    assert!(
        errors_seen >= 4,
        "the fixture's refusals were all exercised"
    );
}
