//! Mixed-adapter batches (`PeftModel::with_batch_adapters`, PEFT's `adapter_names`):
//! - against PEFT 0.21.2 itself (`tests/fixtures/mixed/make_fixtures.py`): mT5 with two LoRA
//!   adapters and base rows (logits, greedy and beam ids), BERT SEQ_CLS with two LoRA adapters
//!   each with its own classifier (`modules_to_save`);
//! - for IA3 and bottleneck adapters, which PEFT does not batch: a mixed batch equals running each
//!   row alone with its adapter, to 1e-5;
//! - refusals: merged adapters and unknown names.

mod common;

use burn::tensor::{Int, Tensor};
use common::{B, Fixture, assert_close, fixture_path, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::{BASE, BnConfig, Ia3Config, ParamMut, PeftModel};
use peft::io::{from_pretrained, load_adapter, load_bert, load_bert_classifier, load_t5};
use peft::models::T5ForConditionalGeneration;

const NAMES_T5: [&str; 4] = ["a", BASE, "b", "a"];
const NAMES_BERT: [&str; 3] = ["b", BASE, "a"];

fn mt5_two_loras() -> PeftModel<B, T5ForConditionalGeneration<B>> {
    let device = Default::default();
    let (base, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let (mut peft, report) = from_pretrained(base, &fixture_path("t5/mt5_lora"), "a").unwrap();
    assert!(report.unused.is_empty());
    let report = load_adapter(&mut peft, &fixture_path("mixed/mt5_lora_b"), "b").unwrap();
    assert!(report.unused.is_empty(), "{report:?}");
    peft
}

fn row<const D: usize, K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>>(
    t: Tensor<B, D, K>,
    r: usize,
) -> Tensor<B, D, K> {
    t.narrow(0, r, 1)
}

/// `f` on the model with `name` active for every row (the base alone for `BASE`).
fn alone<M: peft::core::AdapterHost<B>, R>(
    peft: &mut PeftModel<B, M>,
    name: &str,
    f: impl FnOnce(&M) -> R,
) -> R {
    if name == BASE {
        peft.disable_adapters();
    } else {
        peft.set_adapter(&[name]).unwrap();
    }
    let out = f(&peft.base_model);
    peft.enable_adapters();
    out
}

#[test]
fn mt5_mixed_batch_matches_peft_adapter_names() {
    let device = Default::default();
    let mut peft = mt5_two_loras();
    let fx = Fixture::load("mixed/mt5_outputs.safetensors");
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let dec = fx.get_int::<B, 2>("decoder_input_ids", &device);
    let expected_ids = fx.rows("generated");
    let max_new = expected_ids[0].len() - 1;

    let (logits, greedy, beam) = peft
        .with_batch_adapters(&NAMES_T5, |m| {
            (
                m.forward(ids.clone(), Some(mask.clone()), dec.clone())
                    .logits,
                m.generate_greedy(ids.clone(), Some(mask.clone()), max_new),
                m.generate_beam(ids.clone(), Some(mask.clone()), max_new, 2),
            )
        })
        .unwrap();
    assert_close(
        logits.clone(),
        fx.get("logits", &device),
        1e-4,
        "mixed logits vs PEFT",
    );
    assert_eq!(greedy, expected_ids, "greedy ids vs PEFT");
    assert_eq!(beam, fx.rows("generated_beam2"), "beam ids vs PEFT");

    // The fixture discriminates: each adapter's logits differ from the others' on every row.
    let whole = |n: &str| fx.get::<B, 3>(&format!("logits_{n}"), &device);
    for (r, name) in NAMES_T5.iter().enumerate() {
        for other in ["a", "b", BASE] {
            let d = max_abs_diff(&to_vec(row(whole(name), r)), &to_vec(row(whole(other), r)));
            assert!(
                other == *name || d > 1e-3,
                "row {r}: {name} vs {other}: {d}"
            );
        }
    }

    // Each row alone, with its adapter active (or none): equal to its row of the mixed batch.
    for (r, name) in NAMES_T5.iter().enumerate() {
        let y = alone(&mut peft, name, |m: &T5ForConditionalGeneration<B>| {
            m.forward(
                row(ids.clone(), r),
                Some(row(mask.clone(), r)),
                row(dec.clone(), r),
            )
            .logits
        });
        let d = max_abs_diff(&to_vec(y), &to_vec(row(logits.clone(), r)));
        assert!(d <= 1e-5, "row {r} ({name}) alone vs mixed: {d}");
    }
}

#[test]
fn bert_mixed_batch_with_per_adapter_heads_matches_peft() {
    let device = Default::default();
    let (base, _) = load_bert_classifier::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let (mut peft, _) = from_pretrained(base, &fixture_path("bert/bert_lora"), "a").unwrap();
    load_adapter(&mut peft, &fixture_path("mixed/bert_lora_b"), "b").unwrap();
    let fx = Fixture::load("bert/bert_cls/outputs.safetensors");
    let logits = peft
        .with_batch_adapters(&NAMES_BERT, |m| {
            m.forward(
                fx.get_int("input_ids", &device),
                Some(fx.get_int("attention_mask", &device)),
                Some(fx.get_int("token_type_ids", &device)),
            )
            .0
        })
        .unwrap();
    let expected = Fixture::load("mixed/bert_outputs.safetensors");
    assert_close(
        logits,
        expected.get("logits", &device),
        1e-4,
        "mixed SEQ_CLS logits vs PEFT",
    );
}

#[test]
fn merged_adapters_and_unknown_names_refuse_mixed_batches() {
    let mut peft = mt5_two_loras();
    let err = peft.with_batch_adapters(&["a", "c"], |_| ()).unwrap_err();
    assert!(err.to_string().contains("c"), "{err}");
    assert!(peft.with_batch_adapters(&[], |_| ()).is_err());
    peft.set_adapter(&["a"]).unwrap();
    peft.merge_adapter(None, true).unwrap();
    let err = peft.with_batch_adapters(&["a", BASE], |_| ()).unwrap_err();
    assert!(err.to_string().contains("merged"), "{err}");
    // After a mixed batch the active adapters apply to every row again.
    peft.unmerge_adapter();
    let device = Default::default();
    let ids = Tensor::<B, 2, Int>::from_ints([[5, 9, 23, 1], [7, 3, 2, 1]], &device);
    let dec = Tensor::<B, 2, Int>::from_ints([[0, 7], [0, 7]], &device);
    let before = to_vec(
        peft.base_model
            .forward(ids.clone(), None, dec.clone())
            .logits,
    );
    peft.with_batch_adapters(&["b", BASE], |_| ()).unwrap();
    let after = to_vec(peft.base_model.forward(ids, None, dec).logits);
    assert_eq!(before, after);
}

/// Fills every tensor of adapter `name` with seeded values around `center`.
fn randomize<M: peft::core::AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    name: &str,
    seed: u64,
    center: f32,
) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        center + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
    };
    let device = Default::default();
    peft.visit_adapter_params_mut(name, &mut |_, p| match p.param {
        ParamMut::D1(t) => {
            let n = t.dims()[0];
            let v: Vec<f32> = (0..n).map(|_| next()).collect();
            *t = burn::module::Param::from_tensor(Tensor::from_floats(v.as_slice(), &device));
        }
        ParamMut::D2(t) => {
            let [a, b] = t.dims();
            let v: Vec<f32> = (0..a * b).map(|_| next()).collect();
            *t = burn::module::Param::from_tensor(
                Tensor::<B, 1>::from_floats(v.as_slice(), &device).reshape([a, b]),
            );
        }
    });
}

#[test]
fn ia3_mixed_batch_equals_each_row_alone() {
    let device = Default::default();
    let (base, _) = load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let mut peft = PeftModel::new(base, Ia3Config::default(), "x").unwrap();
    peft.add_adapter("y", Ia3Config::default()).unwrap();
    randomize(&mut peft, "x", 1, 1.0);
    randomize(&mut peft, "y", 2, 1.0);
    let fx = Fixture::load("mixed/mt5_outputs.safetensors");
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let dec = fx.get_int::<B, 2>("decoder_input_ids", &device);
    let names = ["y", BASE, "x", "y"];
    let (mixed, greedy) = peft
        .with_batch_adapters(&names, |m| {
            (
                m.forward(ids.clone(), Some(mask.clone()), dec.clone())
                    .logits,
                m.generate_greedy(ids.clone(), Some(mask.clone()), 5),
            )
        })
        .unwrap();
    for (r, name) in names.iter().enumerate() {
        let (y, g) = alone(&mut peft, name, |m| {
            let y = m
                .forward(
                    row(ids.clone(), r),
                    Some(row(mask.clone(), r)),
                    row(dec.clone(), r),
                )
                .logits;
            (
                y,
                m.generate_greedy(row(ids.clone(), r), Some(row(mask.clone(), r)), 5),
            )
        });
        let d = max_abs_diff(&to_vec(y), &to_vec(row(mixed.clone(), r)));
        assert!(d <= 1e-5, "IA3 row {r} ({name}): {d}");
        // In the batch, a row that ended early is padded (id 0) to the longest.
        let (head, pad) = greedy[r].split_at(g[0].len().min(greedy[r].len()));
        assert_eq!(g[0], head, "IA3 row {r} ({name}) greedy ids");
        assert!(pad.iter().all(|&t| t == 0), "row {r}: {:?}", greedy[r]);
    }
}

#[test]
fn bottleneck_mixed_batch_equals_each_row_alone() {
    let device = Default::default();
    let (base, _) = load_bert::<B>(&fixture_path("bert/bert_cls"), &device).unwrap();
    let mut peft = PeftModel::new(base, BnConfig::houlsby(), "h").unwrap();
    peft.add_adapter("p", BnConfig::preset("pfeiffer").unwrap())
        .unwrap();
    randomize(&mut peft, "h", 3, 0.0);
    randomize(&mut peft, "p", 4, 0.0);
    let fx = Fixture::load("bert/bert_cls/outputs.safetensors");
    let ids = fx.get_int::<B, 2>("input_ids", &device);
    let mask = fx.get_int::<B, 2>("attention_mask", &device);
    let types = fx.get_int::<B, 2>("token_type_ids", &device);
    let names = ["p", "h", BASE];
    let mixed = peft
        .with_batch_adapters(&names, |m| {
            m.forward(ids.clone(), Some(mask.clone()), Some(types.clone()))
                .last_hidden_state
        })
        .unwrap();
    for (r, name) in names.iter().enumerate() {
        let hidden = |m: &peft::models::BertModel<B>| {
            m.forward(
                row(ids.clone(), r),
                Some(row(mask.clone(), r)),
                Some(row(types.clone(), r)),
            )
            .last_hidden_state
        };
        let y = alone(&mut peft, name, hidden);
        let d = max_abs_diff(&to_vec(y), &to_vec(row(mixed.clone(), r)));
        assert!(d <= 1e-5, "bottleneck row {r} ({name}): {d}");
        if *name != BASE {
            // and the adapter changed the row
            let plain = alone(&mut peft, BASE, hidden);
            let d = max_abs_diff(&to_vec(plain), &to_vec(row(mixed.clone(), r)));
            assert!(d > 1e-3, "bottleneck row {r} ({name}) equals the base: {d}");
        }
    }
}
