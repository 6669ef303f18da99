//! Fuzz target `annotations`: see `evl_fuzz::annotations`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::annotations(data);
});
