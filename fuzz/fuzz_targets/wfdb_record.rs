//! Fuzz target `wfdb_record`: see `evl_fuzz::wfdb_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::wfdb_record(data);
});
