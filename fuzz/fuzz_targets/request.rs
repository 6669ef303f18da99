//! Fuzz target `request`: see `evl_fuzz::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::request(data);
});
