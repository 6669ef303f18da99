//! End-to-end tests of the `evl-ecg` binary: one integration binary, a temp dir per test.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod data;
