//! Two Houlsby bottleneck adapters on one frozen BERT, switched per request: the base weights
//! are loaded once and never change; each request runs with the adapter it names (or none).
//!
//! ```sh
//! cargo run --example bottleneck_swap
//! ```

use std::path::Path;

use peft::burn::backend::NdArray;
use peft::burn::tensor::{Int, Tensor, TensorData};
use peft::core::{BnConfig, PeftModel};

type B = NdArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_dir = root.join("tests/fixtures/bert/bert_cls");
    let out = root.join("target/examples/bottleneck_swap");
    let device = Default::default();

    // Two adapters, as if trained for two tasks, saved in AdapterHub's format.
    <B as peft::burn::tensor::backend::Backend>::seed(&device, 1);
    let (base, _) = peft::io::load_bert::<B>(&model_dir, &device)?;
    let mut trainer_side = PeftModel::new(base, BnConfig::houlsby(), "sentiment")?;
    trainer_side.add_adapter("topic", BnConfig::houlsby())?;
    let dirs = peft::io::save_pretrained(&trainer_side, &out)?;
    println!("saved {} adapters: {dirs:?}", dirs.len());

    // The server side: one frozen base, both adapters loaded next to it.
    let (base, _) = peft::io::load_bert::<B>(&model_dir, &device)?;
    let (mut served, _) = peft::io::from_pretrained(base, &out.join("sentiment"), "sentiment")?;
    peft::io::load_adapter(&mut served, &out.join("topic"), "topic")?;
    println!("adapters: {:?}", served.adapter_names());

    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![2i64, 7, 11, 5, 3], [1, 5]), &device);
    let run = |m: &PeftModel<B, peft::models::BertModel<B>>| {
        m.base_model
            .forward(ids.clone(), None, None)
            .last_hidden_state
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    };
    // Requests name their adapter; switching touches no base weight.
    let mut outputs = Vec::new();
    for request in ["sentiment", "topic", "sentiment"] {
        served.set_adapter(&[request])?;
        let y = run(&served);
        println!("request with {request:>9}: first values {:?}", &y[..3]);
        outputs.push(y);
    }
    served.disable_adapters();
    let base_out = run(&served);
    served.enable_adapters();
    println!(
        "without adapter:          first values {:?}",
        &base_out[..3]
    );
    let d = peft::core::check::max_abs_diff(&outputs[0], &outputs[2]);
    assert!(d == 0.0, "the same adapter gives the same output ({d})");
    assert!(peft::core::check::max_abs_diff(&outputs[0], &outputs[1]) > 0.0);
    println!("switching back and forth is exact: max difference {d}");
    Ok(())
}
