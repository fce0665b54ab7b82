//! The pickle gate walks any byte string without panicking (and never executes anything).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peft_io::pickle::check_pickle(data);
});
