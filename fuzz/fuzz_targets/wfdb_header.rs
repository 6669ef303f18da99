//! Fuzz target `wfdb_header`: see `evl_fuzz::wfdb_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::wfdb_header(data);
});
