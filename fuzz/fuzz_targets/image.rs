//! Fuzz target `image`: see `evl_fuzz::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::image(data);
});
