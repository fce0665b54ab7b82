//! `adapter_config.json` parsing, validation and pattern lookup never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = peft_core::LoraConfig::from_json(text) else { return };
    let _ = config.validate();
    for path in ["encoder.block.0.layer.0.SelfAttention.q", "bert.encoder.layer.1.attention.self.value", ""] {
        let _ = config.rank_for(path);
        let _ = config.alpha_for(path);
    }
    let linears = vec!["encoder.block.0.layer.0.SelfAttention.q".to_string(), "lm_head".to_string()];
    let model = peft_core::targeting::ModelLinears { linears: &linears, model_type: Some("t5"), output_heads: &[] };
    let _ = peft_core::targeting::resolve_targets(&config.targeting(), &model);
    let _ = config.to_json();
});
