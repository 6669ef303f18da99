//! Fuzz target `edf`: see `evl_fuzz::edf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::edf(data);
});
