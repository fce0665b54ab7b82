//! The LoRA toy fixture on the wgpu backend (CI runs it on lavapipe, a software Vulkan driver):
//! adapted, merged and disabled outputs equal PEFT's to 1e-5.
#![cfg(feature = "wgpu")]

mod common;

use common::toy::{Toy, load_peft_tensors};
use common::{Fixture, assert_close, read_json};
use peft::core::{LoraConfig, PeftModel};

type W = burn::backend::Wgpu;

#[test]
fn lora_on_wgpu_matches_peft() {
    let fx = Fixture::load("lora/toy.safetensors");
    let device = burn::backend::wgpu::WgpuDevice::default();
    let meta = read_json("lora/cases.json");
    for case in ["basic", "patterns", "lora_bias", "modules_to_save"] {
        let c = meta["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == case)
            .unwrap();
        let config: LoraConfig =
            serde_json::from_value(c["adapters"][0]["config"].clone()).unwrap();
        let mut peft =
            PeftModel::new(Toy::<W>::from_fixture(&fx, &device), config, "default").unwrap();
        load_peft_tensors(
            &mut peft,
            &fx,
            &format!("{case}.default."),
            "default",
            &device,
        );
        let x = fx.get::<W, 2>("input.x", &device);
        let y = peft.base_model.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{case}.out.y"), &device),
            1e-5,
            &format!("{case} on wgpu"),
        );
        peft.merge_adapter(None, true).unwrap();
        let y = peft.base_model.forward(x.clone());
        assert_close(
            y,
            fx.get(&format!("{case}.out.y_merged"), &device),
            1e-5,
            &format!("{case} merged on wgpu"),
        );
        peft.disable_adapters();
        let y = peft.base_model.forward(x);
        assert_close(
            y,
            fx.get(&format!("{case}.out.y_disabled"), &device),
            1e-5,
            &format!("{case} disabled on wgpu"),
        );
    }
}
