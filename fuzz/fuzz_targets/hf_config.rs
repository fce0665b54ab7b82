//! A model's `config.json` (T5/mT5 and BERT): parsing, the size check and everything derived
//! from a config that parsed never panic, and never allocate what the config describes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = peft_models::T5Config::from_json(text) {
        let _ = c.check_size();
        let _ = c.decoder_layers();
        let _ = c.is_gated();
        let _ = c.activation();
        let _ = c.decoder_start();
        let _ = c.to_hf_json();
    }
    if let Ok(c) = peft_models::BertConfig::from_json(text) {
        let _ = serde_json::to_string(&c);
    }
});
