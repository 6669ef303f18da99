//! The reference scripts the benchmarks drive (PyTorch/POT, wfdb-python, matplotlib), compiled
//! into the binary and written to a temporary directory when a benchmark runs, so a binary
//! moved to another machine or run from any directory measures against the same scripts it
//! was built with. Their sources live in `crates/evl-bench/scripts/`.

use std::path::PathBuf;

/// `torch_losses.py`: every distillation loss in PyTorch, Sinkhorn in POT.
pub const TORCH_LOSSES: (&str, &str) = (
    "torch_losses.py",
    include_str!("../scripts/torch_losses.py"),
);
/// `torch_vlm.py`: the student VLM in PyTorch, same weights.
pub const TORCH_VLM: (&str, &str) = ("torch_vlm.py", include_str!("../scripts/torch_vlm.py"));
/// `torch_hf.py`: a Qwen3-VL or LLaVA-NeXT checkpoint in transformers.
pub const TORCH_HF: (&str, &str) = ("torch_hf.py", include_str!("../scripts/torch_hf.py"));
/// `wfdb_read.py`: wfdb-python's `rdrecord` over the same records.
pub const WFDB_READ: (&str, &str) = ("wfdb_read.py", include_str!("../scripts/wfdb_read.py"));
/// `mpl_render.py`: a matplotlib ECG-paper renderer.
pub const MPL_RENDER: (&str, &str) = ("mpl_render.py", include_str!("../scripts/mpl_render.py"));

/// The scripts written out; removed when dropped.
pub struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    /// Write every script into a fresh temporary directory.
    ///
    /// # Errors
    /// The directory or a file cannot be written.
    pub fn write() -> std::io::Result<Scripts> {
        let dir = tempfile::Builder::new().prefix("evl-bench-").tempdir()?;
        for (name, text) in [TORCH_LOSSES, TORCH_VLM, TORCH_HF, WFDB_READ, MPL_RENDER] {
            std::fs::write(dir.path().join(name), text)?;
        }
        Ok(Scripts { dir })
    }

    /// Where `script` was written.
    pub fn path(&self, script: (&str, &str)) -> PathBuf {
        self.dir.path().join(script.0)
    }
}
