//! End-to-end tests of the `evl-ecg` binary: one integration binary, a temp dir per test.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod data;
mod hf;
mod model;
mod newcomer;

use std::path::PathBuf;
use std::process::Command;

/// The binary under test. Tests run with the package folder as working directory, where the
/// binary's own default (`../shared/data` from the working directory) does not resolve, so the
/// shared data is handed over explicitly (and, under `CI=true`, must exist).
pub(crate) fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evl-ecg"));
    if let Some(d) = data() {
        cmd.env("EVL_SHARED_DATA", d);
    }
    cmd
}

pub(crate) fn data() -> Option<PathBuf> {
    evl_testkit::shared_dir().map(|d| d.join("data"))
}

pub(crate) fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
