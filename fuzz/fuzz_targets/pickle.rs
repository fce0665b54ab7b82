//! The pickle gate walks any byte string without panicking (and never executes anything).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peft_io::pickle::check_pickle(data);
    // Every storage present with 64 bytes: the tensor bounds checks run too.
    let _ = peft_io::pickle::check_pickle_with_storages(data, &|key| {
        Some((format!("archive/data/{key}"), 64))
    });
});
