//! PEFT's LoRA test properties, ported: fresh adapters are no-ops, init statistics equal PEFT's
//! (from the committed draws of `make_fixtures.py`), unmerge restores weights bit for bit,
//! disabled adapters give the base output exactly, a training step changes only adapter
//! parameters, dropout acts only in training, and invalid operations are refused clearly.

mod common;

use burn::module::{AutodiffModule, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use common::toy::{Toy, load_peft_tensors};
use common::{AB, B, Fixture, read_json, to_vec};
use peft::core::{
    AdapterHost, InitLoraWeights, LoraAdapter, LoraConfig, LoraSpec, PeftError, PeftModel,
    TargetModules,
};

fn toy_peft(config: LoraConfig) -> (PeftModel<B, Toy<B>>, Fixture) {
    let fx = Fixture::load("lora/toy.safetensors");
    let model = Toy::from_fixture(&fx, &Default::default());
    (PeftModel::new(model, config, "default").unwrap(), fx)
}

fn qv(init: InitLoraWeights) -> LoraConfig {
    LoraConfig {
        init_lora_weights: init,
        ..LoraConfig::new(4, 8.0, TargetModules::list(["q", "v"]))
    }
}

fn weights<M: AdapterHost<B>>(m: &M) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    m.visit_linears(&mut |_, l| {
        out.push(to_vec(l.weight.val()));
        if let Some(b) = &l.bias {
            out.push(to_vec(b.val()));
        }
    });
    out
}

#[test]
fn fresh_adapter_is_a_no_op_exactly() {
    for init in [InitLoraWeights::Default, InitLoraWeights::Gaussian] {
        let (peft, fx) = toy_peft(qv(init.clone()));
        let x = fx.get::<B, 2>("input.x", &Default::default());
        let base = Toy::<B>::from_fixture(&fx, &Default::default()).forward(x.clone());
        assert_eq!(to_vec(peft.base_model.forward(x)), to_vec(base), "{init:?}");
    }
}

#[test]
fn init_statistics_match_peft() {
    let stats = read_json("lora/cases.json")["init_stats"].clone();
    let device = Default::default();
    for (key, init) in [
        ("true", InitLoraWeights::Default),
        ("gaussian", InitLoraWeights::Gaussian),
    ] {
        let theirs = &stats[key];
        let (fan_in, r) = (
            theirs["in_features"].as_u64().unwrap() as usize,
            theirs["r"].as_u64().unwrap() as usize,
        );
        let spec = LoraSpec {
            r,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            init: init.clone(),
            lora_bias: false,
            use_dora: false,
        };
        let a = LoraAdapter::<B>::new("default", fan_in, 512, &spec, &device);
        let va = to_vec(a.lora_a.val());
        let n = va.len() as f64;
        let mean = va.iter().map(|v| *v as f64).sum::<f64>() / n;
        let std = (va.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(va.iter().all(|v| v.is_finite()), "{key}: non-finite init");
        let absmax = va.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let their_std = theirs["a_std"].as_f64().unwrap();
        assert!(
            (std - their_std).abs() / their_std < 0.05,
            "{key}: std {std} vs PEFT {their_std}"
        );
        assert!(mean.abs() < 0.005, "{key}: mean {mean}");
        if key == "true" {
            // kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            let bound = 1.0 / (fan_in as f64).sqrt();
            assert!(absmax <= bound + 1e-7, "{absmax} > {bound}");
            assert!(absmax > 0.95 * theirs["a_absmax"].as_f64().unwrap());
        }
        assert!(
            to_vec(a.lora_b.val()).iter().all(|v| *v == 0.0),
            "{key}: B starts at zero"
        );
    }
    // init_lora_weights = false: B is random too (PyTorch's nn.Linear init, fan_in = r).
    let spec = LoraSpec {
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        init: InitLoraWeights::Random,
        lora_bias: false,
        use_dora: false,
    };
    let a = LoraAdapter::<B>::new("x", 64, 64, &spec, &device);
    let b = to_vec(a.lora_b.val());
    let bound = 1.0 / 8f32.sqrt();
    assert!(b.iter().any(|v| *v != 0.0) && b.iter().all(|v| v.abs() <= bound));
}

#[test]
fn unmerge_restores_weights_bit_exactly_and_disable_gives_base() {
    let (mut peft, fx) = toy_peft(qv(InitLoraWeights::Random));
    let x = fx.get::<B, 2>("input.x", &Default::default());
    let base_model = Toy::<B>::from_fixture(&fx, &Default::default());
    let before = weights(&peft.base_model);
    let unmerged_y = to_vec(peft.base_model.forward(x.clone()));

    peft.merge_adapter(None, false).unwrap();
    assert_ne!(
        weights(&peft.base_model),
        before,
        "merging changes the weights"
    );
    // merged and unmerged outputs agree (to float rounding)
    let merged_y = to_vec(peft.base_model.forward(x.clone()));
    let diff = peft::core::check::max_abs_diff(&merged_y, &unmerged_y);
    assert!(diff < 1e-5, "merged vs unmerged: {diff}");
    // changing the active set or deleting is refused while merged
    assert!(matches!(
        peft.delete_adapter("default"),
        Err(PeftError::Merged(_))
    ));
    peft.unmerge_adapter();
    assert_eq!(weights(&peft.base_model), before, "unmerge is exact");

    peft.disable_adapters();
    assert_eq!(
        to_vec(peft.base_model.forward(x.clone())),
        to_vec(base_model.forward(x.clone())),
        "disabled adapters give the base output exactly"
    );
    // disabling a merged model unmerges it first, as PEFT does
    peft.enable_adapters();
    peft.merge_adapter(None, false).unwrap();
    peft.disable_adapters();
    assert_eq!(weights(&peft.base_model), before);
    assert_eq!(
        to_vec(peft.base_model.forward(x.clone())),
        to_vec(base_model.forward(x))
    );

    // unload gives back the original model
    let plain = peft.unload();
    assert_eq!(weights(&plain), before);
}

#[test]
fn safe_merge_refuses_non_finite_and_leaves_the_base_untouched() {
    let (mut peft, _fx) = toy_peft(qv(InitLoraWeights::Random));
    let before = weights(&peft.base_model);
    let a = peft.base_model.layer[1].v.adapter_mut("default").unwrap();
    let nan = a.lora_b.val().mul_scalar(f32::NAN);
    a.lora_b = Param::from_tensor(nan);
    let err = peft.merge_adapter(None, true).unwrap_err();
    assert!(
        matches!(&err, PeftError::NonFiniteMerge { site, .. } if site == "encoder.layer.1.v"),
        "{err}"
    );
    assert_eq!(weights(&peft.base_model), before);
    peft.base_model
        .visit_linears(&mut |p, l| assert!(l.merged.is_empty(), "{p} left merged"));
}

#[test]
fn training_step_changes_only_adapter_parameters() {
    let fx = Fixture::load("lora/toy.safetensors");
    let device = Default::default();
    let model = Toy::<AB>::from_fixture(&fx, &device);
    let config = qv(InitLoraWeights::Random);
    let mut peft = PeftModel::new(model, config, "default").unwrap();
    // Load PEFT's adapter so the starting point is the fixture's, then train one step.
    let n = load_peft_tensors(&mut peft, &fx, "basic.default.", "default", &device);
    assert_eq!(n, 12);
    let x = fx.get::<AB, 2>("input.x", &device);
    let target = Tensor::<AB, 2>::random([5, 4], Distribution::Normal(0.0, 1.0), &device);

    let snapshot = |m: &Toy<AB>| {
        let mut base = Vec::new();
        let mut lora = Vec::new();
        m.visit_linears(&mut |_, l| {
            base.push(to_vec(l.weight.val()));
            if let Some(b) = &l.bias {
                base.push(to_vec(b.val()));
            }
            for a in &l.lora {
                lora.push(to_vec(a.lora_a.val()));
                lora.push(to_vec(a.lora_b.val()));
            }
        });
        (base, lora)
    };
    let (base0, lora0) = snapshot(&peft.base_model);

    let y = peft.base_model.forward(x);
    let loss = (y - target).powf_scalar(2.0).mean();
    let grads = loss.backward();
    let grads = GradientsParams::from_grads(grads, &peft.base_model);
    // Gradients exist for the 12 LoRA matrices and nothing else: the frozen base gets no
    // gradient, hence no optimizer state.
    assert_eq!(grads.len(), 12, "only adapter parameters receive gradients");
    let mut optim = AdamWConfig::new().init();
    peft.base_model = optim.step(1e-2, peft.base_model, grads);

    let (base1, lora1) = snapshot(&peft.base_model);
    assert_eq!(
        base0, base1,
        "base parameters are bit-identical after a step"
    );
    assert_eq!(lora0.len(), lora1.len());
    for (i, (a, b)) in lora0.iter().zip(&lora1).enumerate() {
        assert_ne!(a, b, "adapter tensor {i} was updated");
    }
}

#[test]
fn dropout_only_in_training() {
    let fx = Fixture::load("lora/toy.safetensors");
    let device = Default::default();
    let config = LoraConfig {
        lora_dropout: 0.5,
        ..qv(InitLoraWeights::Random)
    };
    let mut peft =
        PeftModel::new(Toy::<AB>::from_fixture(&fx, &device), config, "default").unwrap();
    load_peft_tensors(&mut peft, &fx, "dropout.default.", "default", &device);
    let x = fx.get::<AB, 2>("input.x", &device);
    // Training (autodiff backend): dropout on the LoRA branch changes the output.
    let train_y = to_vec(peft.base_model.forward(x.clone()));
    // Inference (`valid()`): no dropout; equals PEFT's eval-mode output.
    let eval_model = peft.base_model.valid();
    let eval_y = eval_model.forward(x.inner());
    assert_ne!(train_y, to_vec(eval_y.clone()), "dropout acts in training");
    common::assert_close(
        eval_y,
        fx.get::<B, 2>("dropout.out.y", &device),
        1e-5,
        "eval output",
    );
}

#[test]
fn adapter_management_errors_are_clear() {
    let (mut peft, _) = toy_peft(qv(InitLoraWeights::Default));
    let err = peft.set_adapter(&["nope"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "adapter `nope` not found; existing adapters: [default]"
    );
    let err = peft
        .add_adapter("default", qv(InitLoraWeights::Default))
        .unwrap_err();
    assert!(matches!(err, PeftError::AdapterExists(_)));
    peft.add_adapter(
        "second",
        LoraConfig::new(2, 2.0, TargetModules::list(["ff"])),
    )
    .unwrap();
    assert_eq!(peft.active_adapters(), ["default"]);
    assert_eq!(
        peft.parameter_counts().trainable,
        384,
        "inactive adapters are frozen"
    );
    peft.set_adapter(&["second"]).unwrap();
    peft.delete_adapter("default").unwrap();
    assert_eq!(peft.adapter_names(), ["second"]);
    peft.base_model
        .visit_linears(&mut |p, l| assert!(l.adapter("default").is_none(), "{p}"));
}

#[test]
fn invalid_configs_are_refused() {
    let model = || Toy::<B>::new(&Default::default());
    let bad = |c: LoraConfig| {
        PeftModel::new(model(), c, "default")
            .unwrap_err()
            .to_string()
    };
    let base = LoraConfig::new(4, 8.0, TargetModules::list(["q"]));
    assert!(
        bad(LoraConfig {
            r: 0,
            ..base.clone()
        })
        .contains("`r` should be a positive integer")
    );
    let with_pattern = LoraConfig {
        layers_pattern: Some(peft::core::config::StringOrList::One("layer".into())),
        ..base.clone()
    };
    assert!(bad(with_pattern).contains("`layers_to_transform` must also be specified"));
    let regex_layers = LoraConfig {
        target_modules: Some(TargetModules::Regex(".*q".into())),
        layers_to_transform: Some(peft::core::config::LayersToTransform::One(0)),
        ..base.clone()
    };
    assert!(bad(regex_layers).contains("cannot be used when `target_modules` is a str"));
    let lookaround = LoraConfig {
        target_modules: Some(TargetModules::Regex("(?!x).*q".into())),
        ..base.clone()
    };
    assert!(bad(lookaround).contains("invalid pattern `(?!x).*q` in `target_modules`"));
    let mut loftq = base.clone();
    loftq.init_lora_weights = InitLoraWeights::Other("loftq".into());
    let e = bad(loftq);
    assert!(
        e.contains("unsupported adapter option: init_lora_weights = \"loftq\""),
        "{e}"
    );
    let no_default = LoraConfig {
        target_modules: None,
        ..base
    };
    assert!(bad(no_default).contains("please specify target_modules"));
}

#[test]
fn config_json_keeps_unknown_fields_and_takes_peft_defaults() {
    let json = r#"{"peft_type": "LORA", "r": 16, "target_modules": ["q", "v"],
                   "some_future_field": {"x": [1, 2]}, "lora_alpha": 32.5}"#;
    let c = LoraConfig::from_json(json).unwrap();
    assert_eq!(c.r, 16);
    assert_eq!(c.lora_alpha, 32.5);
    assert_eq!(c.lora_dropout, 0.0);
    assert_eq!(c.init_lora_weights, InitLoraWeights::Default);
    let back: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
    assert_eq!(back["some_future_field"]["x"][1], 2);
    assert_eq!(back["lora_alpha"], 32.5);
    assert!(LoraConfig::from_json("{\"r\": \"eight\"}").is_err());
}
