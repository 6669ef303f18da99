//! Fuzz target `cinc_mat`: see `evl_fuzz::cinc_mat`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = evl_fuzz::cinc_mat(data);
});
