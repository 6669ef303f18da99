//! Fuzz target `csv`: see `evl_fuzz::csv`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::csv(data);
});
