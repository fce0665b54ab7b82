//! DoRA (`LoraConfig { use_dora: true }`) against PEFT 0.21.2 itself
//! (`tests/fixtures/dora/make_fixtures.py`): an mT5 adapter on q, v and wi_1 with random B and
//! magnitudes away from the weight norms (logits, greedy ids, merged logits, the magnitude PEFT
//! initialises, and every gradient of one training step, which shows the weight norm is
//! detached), and a BERT SEQ_CLS adapter. Plus: unmerge restores the weights bit for bit, the
//! saved file has PEFT's keys, and mixed-adapter batches refuse DoRA as PEFT does.

mod common;

use common::methods::{
    batch, check_bert_seq_cls, check_eval, check_gradients, check_saved_keys, mt5_with,
};
use common::{AB, B, Fixture, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::{AdapterConfig, AdapterHost, PeftModel, dora_weight_norm};
use peft::models::T5ForConditionalGeneration;

fn mt5_dora<BK: burn::tensor::backend::Backend>() -> PeftModel<BK, T5ForConditionalGeneration<BK>> {
    let peft = mt5_with::<BK>("dora/mt5_dora");
    match peft.adapter_config("default") {
        Some(AdapterConfig::Lora(c)) => assert!(c.use_dora),
        other => panic!("{other:?}"),
    }
    peft
}

/// The weights of every linear site, by path.
fn weights(peft: &PeftModel<B, T5ForConditionalGeneration<B>>) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    peft.base_model
        .visit_linears(&mut |p, l| v.push((p.to_string(), to_vec(l.weight.val()))));
    v
}

#[test]
fn mt5_dora_logits_generation_and_merge_match_peft() {
    let mut peft = mt5_dora::<B>();
    let before = weights(&peft);
    check_eval(
        &mut peft,
        &Fixture::load("dora/outputs.safetensors"),
        "DoRA",
    );
    let after = weights(&peft);
    assert!(
        before.iter().zip(&after).all(|(a, b)| a
            .1
            .iter()
            .zip(&b.1)
            .all(|(x, y)| x.to_bits() == y.to_bits())),
        "unmerge restores every weight bit for bit"
    );
}

#[test]
fn mt5_dora_magnitude_init_and_gradients_match_peft() {
    use burn::module::AutodiffModule;
    let device = Default::default();
    let fx = Fixture::load("dora/outputs.safetensors");
    let peft = mt5_dora::<AB>();
    // The magnitude PEFT initialised is the column norm of W + s B A (the saved A and B are the
    // ones it was computed from; only the magnitudes were scaled afterwards).
    let site = "encoder.block.0.layer.0.SelfAttention.q";
    let mut init = None;
    peft.base_model.visit_linears(&mut |path, l| {
        if path == site {
            let a = l.adapter("default").unwrap();
            init = Some(to_vec(
                dora_weight_norm(l.weight.val(), a.delta_weight()).valid(),
            ));
        }
    });
    let want = to_vec(fx.get::<B, 1>(&format!("magnitude_init.{site}"), &device));
    let d = max_abs_diff(&init.unwrap(), &want);
    assert!(d < 1e-5, "magnitude init differs from PEFT's by {d}");
    // PEFT's parameter is `lora_magnitude_vector.weight`; the file key has no `.weight`.
    let n = check_gradients(&peft, &fx, |k| {
        if k == "lora_magnitude_vector" {
            format!("{k}.weight")
        } else {
            k.to_string()
        }
    });
    assert_eq!(n, 63, "21 sites x (A, B, magnitude)");
}

#[test]
fn bert_seq_cls_dora_matches_peft() {
    check_bert_seq_cls("dora/bert_dora", "dora/bert_outputs.safetensors", "DoRA");
}

#[test]
fn dora_saves_peft_keys_and_mixed_batches_refuse_it() {
    let mut peft = mt5_dora::<B>();
    let cfg = check_saved_keys(&peft, "dora/mt5_dora", "LORA");
    assert_eq!(cfg["use_dora"], true);
    let err = peft
        .with_batch_adapters(&["default"], |_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
}

#[test]
fn dora_converts_to_lora_with_the_error_it_reports() {
    use peft::core::methods::lora::convert::dora_to_lora;
    let device = Default::default();
    let fx = Fixture::load("dora/outputs.safetensors");
    let (ids, mask, dec, _) = batch::<B>(&fx, &device);
    let logits = |p: &PeftModel<B, T5ForConditionalGeneration<B>>| {
        to_vec(
            p.base_model
                .forward(ids.clone(), Some(mask.clone()), dec.clone())
                .logits,
        )
    };

    // Full rank (the sites are at most 32 x 48): the LoRA is DoRA's change itself.
    let mut peft = mt5_dora::<B>();
    let dora_logits = logits(&peft);
    let report = dora_to_lora(&mut peft, "default", "lora", 32).unwrap();
    assert_eq!(report.sites.len(), 21);
    assert!(report.relative_error < 1e-5, "{}", report.relative_error);
    peft.set_adapter(&["lora"]).unwrap();
    let d = max_abs_diff(&logits(&peft), &dora_logits);
    assert!(d < 1e-4, "full-rank LoRA vs DoRA logits: {d}");

    // Rank 2: the reported error is the one of the merged weights.
    let mut peft = mt5_dora::<B>();
    let base = weights(&peft);
    peft.merge_adapter(None, true).unwrap();
    let dora_w = weights(&peft);
    peft.unmerge_adapter();
    let report = dora_to_lora(&mut peft, "default", "lora", 2).unwrap();
    peft.set_adapter(&["lora"]).unwrap();
    peft.merge_adapter(None, true).unwrap();
    let lora_w = weights(&peft);
    for s in &report.sites {
        let i = base.iter().position(|b| b.0 == s.path).unwrap();
        let (mut e2, mut n2) = (0.0f64, 0.0f64);
        for ((w0, wd), wl) in base[i].1.iter().zip(&dora_w[i].1).zip(&lora_w[i].1) {
            let (d, l) = ((wd - w0) as f64, (wl - w0) as f64);
            e2 += (d - l) * (d - l);
            n2 += d * d;
        }
        let measured = (e2 / n2).sqrt();
        assert!(
            (measured - s.relative_error).abs() < 1e-3 * s.relative_error.max(1e-3),
            "{}: reported {} measured {measured}",
            s.path,
            s.relative_error
        );
    }
    assert!(
        report.relative_error > 0.01,
        "rank 2 cannot hold DoRA's rescaling of W"
    );
    let plain = match peft.adapter_config("lora") {
        Some(AdapterConfig::Lora(c)) => c.clone(),
        other => panic!("{other:?}"),
    };
    assert!(!plain.use_dora && plain.r == 2 && plain.lora_alpha == 2.0);
}
