//! Several LoRA adapters over one frozen mT5 for inference: load them from PEFT directories,
//! pick one per request, combine them, and merge one into the weights for the fastest path.
//!
//! ```sh
//! cargo run --example multi_adapter_inference
//! ```

use std::path::Path;

use peft::burn::backend::NdArray;
use peft::burn::tensor::{Int, Tensor, TensorData};
use peft::core::PeftModel;
use peft::models::T5ForConditionalGeneration;

type B = NdArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/t5");
    let device = Default::default();

    // One base; two adapters trained for it by Python PEFT (committed test fixtures).
    let (base, _) = peft::io::load_t5::<B>(&fixtures.join("mt5"), &device)?;
    let (mut model, _) = peft::io::from_pretrained(base, &fixtures.join("mt5_lora"), "plain")?;
    peft::io::load_adapter(&mut model, &fixtures.join("mt5_lora_patterns"), "patterns")?;
    println!("adapters: {:?}", model.adapter_names());

    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 23, 1], [1, 4]), &device);
    let dec = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 7], [1, 2]), &device);
    let logits = |m: &PeftModel<B, T5ForConditionalGeneration<B>>| {
        m.base_model
            .forward(ids.clone(), None, dec.clone())
            .logits
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    };

    // Per request: the adapter the request names.
    let mut per_adapter = Vec::new();
    for name in ["plain", "patterns"] {
        model.set_adapter(&[name])?;
        let y = logits(&model);
        println!("{name:>8}: logits[..3] = {:?}", &y[..3]);
        per_adapter.push(y);
    }
    // Both at once: PEFT sums the active adapters' deltas.
    model.set_adapter(&["plain", "patterns"])?;
    println!("    both: logits[..3] = {:?}", &logits(&model)[..3]);

    // Merging folds one adapter into the weights (no extra cost per token); unmerging restores
    // the base exactly, so the next request can use another adapter.
    model.set_adapter(&["plain"])?;
    model.merge_adapter(None, true)?;
    let merged = logits(&model);
    let d = peft::core::check::max_abs_diff(&merged, &per_adapter[0]);
    println!("merged vs unmerged `plain`: max difference {d:.2e}");
    assert!(d <= 1e-4, "merging keeps the outputs ({d})");
    model.unmerge_adapter();
    model.set_adapter(&["patterns"])?;
    assert_eq!(logits(&model), per_adapter[1], "unmerge is exact");

    // For a single-adapter deployment: merge and drop the adapter machinery.
    model.set_adapter(&["plain"])?;
    let plain: T5ForConditionalGeneration<B> = model.merge_and_unload(true)?;
    let y = plain
        .forward(ids, None, dec)
        .logits
        .into_data()
        .to_vec::<f32>()?;
    println!(
        "merge_and_unload: max difference {:.2e}",
        peft::core::check::max_abs_diff(&y, &per_adapter[0])
    );
    Ok(())
}
