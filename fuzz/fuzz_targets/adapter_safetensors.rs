//! Reading an arbitrary file as adapter weights fails cleanly or yields tensors; never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("peft-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(source) = peft_io::TensorSource::safetensors(&path) {
        for name in source.names() {
            let _ = source.get_f32(&name);
        }
    }
});
