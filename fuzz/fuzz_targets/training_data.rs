//! The training data readers (JSONL and CSV) and `TrainingArgs` from JSON: never a panic, and
//! every error names a line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["train.jsonl", "train.csv"] {
        if let Ok(rows) = peft_train::parse_examples(Path::new(name), text, "text", "label") {
            assert!(!rows.is_empty());
            for r in rows.iter().take(4) {
                let _ = peft_train::apply_template("Tweet text : {text} Label :", &r.text);
            }
        }
    }
    if let Ok(args) = serde_json::from_str::<peft_train::TrainingArgs>(text) {
        let _ = args.validate();
    }
});
