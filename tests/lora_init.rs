//! PEFT's data-free LoRA inits against PEFT 0.21.2 itself
//! (`tests/fixtures/lora_init/make_fixtures.py`): PiSSA and OLoRA give PEFT's factors (up to
//! the sign of each component, which an SVD or QR leaves free; `B A` is unique) and PEFT's
//! residual base weights; the adapted model at init computes the base model's outputs; the
//! orthogonal init starts at `B A = 0` with neither factor zero; and a trained PiSSA adapter
//! saved as a plain LoRA of the original base reproduces the trained model there.

mod common;

use burn::module::Param;
use common::methods::batch;
use common::{B, Fixture, fixture_path, to_vec};
use peft::core::check::max_abs_diff;
use peft::core::{AdapterHost, InitLoraWeights, LoraConfig, PeftModel, TargetModules};
use peft::models::T5ForConditionalGeneration;

fn base() -> T5ForConditionalGeneration<B> {
    peft::io::load_t5::<B>(&fixture_path("t5/mt5"), &Default::default())
        .unwrap()
        .0
}

fn config(init: &str) -> LoraConfig {
    LoraConfig {
        init_lora_weights: InitLoraWeights::Other(init.into()),
        ..LoraConfig::new(4, 8.0, TargetModules::list(["q", "v", "wo"]))
    }
}

fn logits(m: &T5ForConditionalGeneration<B>) -> Vec<f32> {
    let fx = Fixture::load("t5/mt5_lora_outputs.safetensors");
    let (ids, mask, dec, _) = batch::<B>(&fx, &Default::default());
    to_vec(m.forward(ids, Some(mask), dec).logits)
}

#[test]
fn pissa_and_olora_match_peft_factors_and_residual_weights() {
    for init in ["pissa", "olora"] {
        let fx = Fixture::load(&format!("lora_init/{init}.safetensors"));
        let peft = PeftModel::new(base(), config(init), "default").unwrap();
        let mut sites = 0;
        let (mut worst_w, mut worst_ab) = (0.0f32, 0.0f32);
        peft.base_model.visit_linears(&mut |path, layer| {
            let Some(ad) = layer.adapter("default") else {
                return;
            };
            sites += 1;
            let w = to_vec(layer.weight.val().transpose());
            let want_w = &fx.tensors[&format!("{path}.weight")].1;
            worst_w = worst_w.max(max_abs_diff(&w, want_w));
            let (r, d_in, d_out) = (ad.r, layer.d_input(), layer.d_output());
            let a = to_vec(ad.lora_a.val().transpose()); // [r, in]
            let b = to_vec(ad.lora_b.val().transpose()); // [out, r]
            let wa = &fx.tensors[&format!("{path}.lora_A")].1;
            let wb = &fx.tensors[&format!("{path}.lora_B")].1;
            for k in 0..r {
                let row = |m: &[f32]| m[k * d_in..(k + 1) * d_in].to_vec();
                let col = |m: &[f32]| (0..d_out).map(|o| m[o * r + k]).collect::<Vec<f32>>();
                let dot: f32 = row(&a).iter().zip(row(wa)).map(|(x, y)| x * y).sum();
                let s = if dot < 0.0 { -1.0 } else { 1.0 };
                let flip = |v: Vec<f32>| v.into_iter().map(|x| x * s).collect::<Vec<f32>>();
                worst_ab = worst_ab
                    .max(max_abs_diff(&flip(row(&a)), &row(wa)))
                    .max(max_abs_diff(&flip(col(&b)), &col(wb)));
            }
        });
        // q and v of every attention (encoder, decoder self and cross) and wo of every block.
        assert_eq!(sites, 2 * 3 + 3 * 5, "{init}");
        assert_eq!(
            sites * 3,
            fx.tensors.len(),
            "{init}: every site PEFT adapted"
        );
        eprintln!("{init}: residual weights within {worst_w:.1e}, factors within {worst_ab:.1e}");
        assert!(
            worst_w < 1e-5,
            "{init}: residual weights differ by {worst_w}"
        );
        assert!(worst_ab < 1e-4, "{init}: factors differ by {worst_ab}");
        // At init the adapted model is the base model.
        let d = max_abs_diff(&logits(&peft.base_model), &logits(&base()));
        assert!(d < 1e-4, "{init}: init changes the outputs by {d}");
    }
}

#[test]
fn pissa_niter_and_orthogonal_start_where_the_base_is() {
    let device = Default::default();
    let plain = logits(&base());
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    let peft = PeftModel::new(base(), config("pissa_niter_4"), "default").unwrap();
    let d = max_abs_diff(&logits(&peft.base_model), &plain);
    assert!(d < 1e-4, "pissa_niter_4 changes the outputs by {d}");
    // The randomized SVD moves a rank-r part of the base into the adapter: no more than the
    // exact SVD's (the best rank-r part), and most of it.
    let exact = PeftModel::new(base(), config("pissa"), "default").unwrap();
    let weights = |p: &PeftModel<B, T5ForConditionalGeneration<B>>| {
        let mut v = Vec::new();
        p.base_model
            .visit_linears(&mut |_, l| v.extend(to_vec(l.weight.val())));
        v
    };
    let (a, b, orig) = (
        weights(&peft),
        weights(&exact),
        weights(&PeftModel::without_adapters(base())),
    );
    let norm = |x: &[f32]| {
        x.iter()
            .zip(&orig)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (moved, best) = (norm(&a), norm(&b));
    eprintln!("pissa_niter_4 moves {moved:.3} of the base into the adapter; exact PiSSA {best:.3}");
    assert!(
        moved <= best * 1.0001 && moved > 0.8 * best,
        "{moved} vs {best}"
    );

    let peft = PeftModel::new(base(), config("orthogonal"), "default").unwrap();
    assert_eq!(weights(&peft), orig, "orthogonal leaves the base alone");
    peft.base_model.visit_linears(&mut |path, layer| {
        if let Some(ad) = layer.adapter("default") {
            let (a, b) = (ad.lora_a.val(), ad.lora_b.val());
            assert!(
                to_vec(a.clone()).iter().all(|v| *v != 0.0),
                "{path}: A is not zero"
            );
            assert!(
                to_vec(b.clone()).iter().any(|v| *v != 0.0),
                "{path}: B is not zero"
            );
            let ba = to_vec(a.matmul(b));
            assert!(ba.iter().all(|v| v.abs() < 1e-6), "{path}: B A = 0 at init");
        }
    });
    let mut odd = config("orthogonal");
    odd.r = 3;
    let e = PeftModel::new(base(), odd, "default")
        .unwrap_err()
        .to_string();
    assert!(e.contains("even"), "{e}");
    let e = PeftModel::new(base(), config("pissa_niter_x"), "default")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pissa_niter_"), "{e}");
}

#[test]
fn a_trained_pissa_adapter_saves_as_a_plain_lora_of_the_original_base() {
    let mut peft = PeftModel::new(base(), config("pissa"), "default").unwrap();
    let initial = peft::io::adapter::adapter_state_dict(&peft, "default");
    // "Training": move every factor.
    peft.base_model.visit_linears_mut(&mut |_, layer| {
        if let Some(ad) = layer.adapter_mut("default") {
            let a = ad.lora_a.val();
            let b = ad.lora_b.val();
            ad.lora_a =
                Param::initialized(ad.lora_a.id, a.clone() + a.ones_like().mul_scalar(0.01));
            ad.lora_b = Param::initialized(ad.lora_b.id, b.clone().mul_scalar(1.1));
        }
    });
    let trained = logits(&peft.base_model);
    let dir = std::env::temp_dir().join(format!("peft-pissa-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = peft::io::lora_init::save_as_plain_lora(&peft, "default", &initial, &dir).unwrap();
    assert_eq!((config.r, config.lora_alpha), (8, 16.0));
    assert_eq!(config.init_lora_weights, InitLoraWeights::Default);
    // On the unchanged base, as any LoRA adapter.
    let (plain, report) = peft::io::from_pretrained(base(), &dir, "default").unwrap();
    assert!(report.unused.is_empty());
    let d = max_abs_diff(&logits(&plain.base_model), &trained);
    eprintln!("plain LoRA on the original base vs trained PiSSA model: {d:.1e}");
    assert!(d < 1e-4, "{d}");
    std::fs::remove_dir_all(&dir).ok();
}
