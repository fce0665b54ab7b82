//! `add_weighted_adapter` (`peft merge-adapters`) against PEFT 0.21.2 itself
//! (`tests/fixtures/merge/make_fixtures.py`): every combination type on three mT5 LoRA adapters
//! of different targets, ranks, alphas and rank patterns, with positive and negative weights.
//!
//! Tolerances: the factor types (linear, cat, ties, dare, magnitude pruning) are element-wise f32
//! arithmetic in PEFT's order, compared factor by factor to 1e-6. The SVD types are compared on
//! the weight change `B A` of every site, which the SVD fixes up to rounding (the factors
//! themselves only up to the sign of each singular pair): peft runs the SVD in f64, PyTorch in
//! f32, so the change agrees to 1e-5 of its largest element. `svd_clamp` depends on those signs
//! and is checked on its own.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use common::{B, fixture_path};
use peft::core::check::max_abs_diff;
use peft::core::methods::lora::weighted::{CombinationType, MajoritySignMethod, WeightedMerge};
use peft::core::{AdapterHost, PeftModel, TargetModules};
use peft::io::tensors::F32Tensor;
use serde_json::Value;

fn read_tensors(dir: &Path) -> BTreeMap<String, F32Tensor> {
    let src = peft::io::adapter::open_adapter_weights(dir).unwrap();
    src.names()
        .into_iter()
        .map(|k| {
            let t = src.get_f32(&k).unwrap().unwrap();
            (k, t)
        })
        .collect()
}

/// `B A` of every site, `[out, in]`.
fn products(t: &BTreeMap<String, F32Tensor>) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for (k, (sa, a)) in t {
        let Some(site) = k.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let (sb, b) = &t[&format!("{site}.lora_B.weight")];
        let (r, d_in, d_out) = (sa[0], sa[1], sb[0]);
        let mut p = vec![0.0f32; d_out * d_in];
        for o in 0..d_out {
            for k in 0..r {
                for i in 0..d_in {
                    p[o * d_in + i] += b[o * r + k] * a[k * d_in + i];
                }
            }
        }
        out.insert(site.to_string(), p);
    }
    out
}

fn options(case: &Value) -> WeightedMerge {
    let mut m = WeightedMerge::new(case["combination_type"].as_str().unwrap().parse().unwrap());
    if let Some(d) = case.get("density").and_then(Value::as_f64) {
        m = m.with_density(d);
    }
    if let Some(r) = case.get("svd_rank").and_then(Value::as_u64) {
        m = m.with_svd_rank(r as usize);
    }
    if let Some(s) = case.get("majority_sign_method").and_then(Value::as_str) {
        m = m.with_majority_sign_method(s.parse().unwrap());
    }
    m
}

fn cases() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(fixture_path("merge/cases.json")).unwrap();
    let v: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    v.into_iter().collect()
}

fn case_inputs(case: &Value) -> (Vec<std::path::PathBuf>, Vec<f64>) {
    let dirs = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| fixture_path(&format!("merge/{}", a.as_str().unwrap())))
        .collect();
    let weights = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    (dirs, weights)
}

/// Compares a merged adapter with PEFT's; returns the worst difference and what it measured.
fn compare(
    name: &str,
    merge: &WeightedMerge,
    n: usize,
    got: &BTreeMap<String, F32Tensor>,
    want: &BTreeMap<String, F32Tensor>,
) -> (f32, &'static str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}: key set"
    );
    for (k, (shape, _)) in want {
        assert_eq!(&got[k].0, shape, "{name}: {k}");
    }
    if merge.effective_type(n).is_svd() {
        let (g, w) = (products(got), products(want));
        let mut worst = 0.0f32;
        for (site, wv) in &w {
            let scale = wv
                .iter()
                .fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
            let d = max_abs_diff(&g[site], wv) / scale.max(1e-12);
            worst = if d > worst || d.is_nan() { d } else { worst };
        }
        (worst, "relative difference of B A")
    } else {
        let mut worst = 0.0f32;
        for (k, (_, wv)) in want {
            let d = max_abs_diff(&got[k].1, wv);
            worst = if d > worst || d.is_nan() { d } else { worst };
        }
        (worst, "factors")
    }
}

#[test]
fn every_combination_type_matches_peft() {
    let mut failures = peft::core::check::Failures::default();
    for (name, case) in cases() {
        let merge = options(&case);
        let (dirs, weights) = case_inputs(&case);
        let dir_refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
        let merged = peft::io::weighted::merge_adapter_dirs(&dir_refs, &weights, &merge).unwrap();
        let want_dir = fixture_path(&format!("merge/{name}"));
        let want_cfg = peft::io::read_adapter_config(&want_dir).unwrap();
        let want_cfg = want_cfg.as_lora().unwrap();
        assert_eq!(
            (merged.config.r, merged.config.lora_alpha),
            (want_cfg.r, want_cfg.lora_alpha),
            "{name}: r, lora_alpha"
        );
        let set = |t: &Option<TargetModules>| match t {
            Some(TargetModules::List(l)) => l.iter().cloned().collect::<HashSet<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            set(&merged.config.target_modules),
            set(&want_cfg.target_modules),
            "{name}: target_modules"
        );
        assert!(merged.config.rank_pattern.is_empty() && merged.config.alpha_pattern.is_empty());
        let (worst, what) = compare(
            &name,
            &merge,
            dirs.len(),
            &merged.tensors,
            &read_tensors(&want_dir),
        );
        let tol = if what == "factors" { 1e-6 } else { 1e-5 };
        eprintln!("{name}: {what} within {worst:.2e}");
        if worst.is_nan() || worst > tol {
            failures.fail(format!("{name}: {what} differ by {worst:e} > {tol:e}"));
        }
    }
    failures.finish().unwrap();
}

#[test]
fn merging_loaded_adapters_equals_merging_files() {
    // PeftModel::add_weighted_adapter on the mT5 fixture with the three inputs loaded gives the
    // tensors merge_adapter_dirs gives, and the merged adapter saves and reloads.
    let device = Default::default();
    let (base, _) = peft::io::load_t5::<B>(&fixture_path("t5/mt5"), &device).unwrap();
    let mut peft = PeftModel::without_adapters(base);
    for a in ["a", "b", "c"] {
        peft::io::load_adapter(&mut peft, &fixture_path(&format!("merge/{a}")), a).unwrap();
    }
    for (name, case) in cases() {
        let merge = options(&case);
        let (dirs, weights) = case_inputs(&case);
        let names: Vec<String> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        peft.add_weighted_adapter(&names, &weights, &name, &merge)
            .unwrap();
        let got = peft::io::adapter::adapter_state_dict(&peft, &name);
        let dir_refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
        let files = peft::io::weighted::merge_adapter_dirs(&dir_refs, &weights, &merge).unwrap();
        // Sites the union of the targets reaches that no input has (none here) would be zeros.
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            files.tensors.keys().collect::<Vec<_>>()
        );
        for (k, (_, v)) in &files.tensors {
            assert!(max_abs_diff(&got[k].1, v) <= 1e-6, "{name}: {k}");
        }
        peft.delete_adapter(&name).unwrap();
    }
    let mut linears = 0;
    peft.base_model.visit_linears(&mut |_, _| linears += 1);
    assert!(linears > 0);
}

#[test]
fn options_and_inputs_are_checked() {
    let a = fixture_path("merge/a");
    let c = fixture_path("merge/c");
    let dirs = [a.as_path(), c.as_path()];
    let err = |m: &WeightedMerge, w: &[f64]| {
        peft::io::weighted::merge_adapter_dirs(&dirs, w, m)
            .unwrap_err()
            .to_string()
    };
    let e = err(&WeightedMerge::new(CombinationType::Linear), &[1.0, 1.0]);
    assert!(e.contains("one rank") && e.contains("[4, 3]"), "{e}");
    let e = err(&WeightedMerge::new(CombinationType::Ties), &[1.0, 1.0]);
    assert!(e.contains("needs a density"), "{e}");
    let e = err(&WeightedMerge::new(CombinationType::Cat), &[1.0]);
    assert!(e.contains("1 weights for 2 adapters"), "{e}");
    let e = err(
        &WeightedMerge::new(CombinationType::DareLinear).with_density(1.5),
        &[1.0, 1.0],
    );
    assert!(e.contains("density must be in [0, 1]"), "{e}");
    let e = err(
        &WeightedMerge::new(CombinationType::Svd).with_svd_rank(40),
        &[1.0, 1.0],
    );
    assert!(e.contains("exceeds the layer's smaller side"), "{e}");
    // Not LoRA: named with the file.
    let ia3 = fixture_path("bottleneck/ia3_mt5");
    let e = peft::io::weighted::merge_adapter_dirs(
        &[a.as_path(), ia3.as_path()],
        &[1.0, 1.0],
        &WeightedMerge::new(CombinationType::Cat),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ia3_mt5") && e.contains("IA3"), "{e}");
    // Frequency sign election parses; a bogus one is named.
    assert_eq!(
        "frequency".parse::<MajoritySignMethod>().unwrap(),
        MajoritySignMethod::Frequency
    );
    assert!("most".parse::<MajoritySignMethod>().is_err());
}

#[test]
fn svd_clamp_bounds_the_factors_at_the_quantile() {
    let (a, b) = (fixture_path("merge/a"), fixture_path("merge/b"));
    let dirs = [a.as_path(), b.as_path()];
    let plain = peft::io::weighted::merge_adapter_dirs(
        &dirs,
        &[0.7, 0.3],
        &WeightedMerge::new(CombinationType::Svd),
    )
    .unwrap();
    let clamped = peft::io::weighted::merge_adapter_dirs(
        &dirs,
        &[0.7, 0.3],
        &WeightedMerge::new(CombinationType::Svd).with_svd_clamp(0.9),
    )
    .unwrap();
    for site in &plain.sites {
        let key = |p: &str| format!("base_model.model.{site}.lora_{p}.weight");
        let mut all: Vec<f32> = ["B", "A"]
            .iter()
            .flat_map(|p| plain.tensors[&key(p)].1.clone())
            .collect();
        all.sort_by(f32::total_cmp);
        let pos = 0.9 * (all.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let q = all[lo] + (all[hi] - all[lo]) * (pos - lo as f64) as f32;
        for p in ["B", "A"] {
            for (x, y) in clamped.tensors[&key(p)]
                .1
                .iter()
                .zip(&plain.tensors[&key(p)].1)
            {
                assert_eq!(*x, y.clamp(-q, q), "{site} {p}");
            }
        }
    }
}
