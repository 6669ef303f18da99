//! Checkpoints: model parameters as safetensors (burn-store), optimiser state as a burnpack,
//! and `state.json` (step, logs). Every file is written to a temporary name and renamed, and
//! `state.json` goes last, so a run killed mid-write resumes from the previous complete
//! checkpoint.

use std::path::Path;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;

use crate::{Error, Result};
use evl_run::StepLog;

/// The resumable part of a run (`state.json`).
pub use evl_run::CheckpointState as State;

fn ck(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn tmp_of(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    s.into()
}

/// Write model, optimiser and state into `dir`.
pub fn save<M: Module>(
    dir: &Path,
    model: &M,
    optim: &ModuleOptimizer,
    step: usize,
    logs: &[StepLog],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mpath = dir.join("model.safetensors");
    let mtmp = tmp_of(&mpath);
    let mut store = SafetensorsStore::from_file(&mtmp);
    model.save_into(&mut store).map_err(|e| ck(&mtmp, e))?;
    std::fs::rename(&mtmp, &mpath).map_err(|e| ck(&mpath, e))?;
    // The burnpack copy keeps parameter identities, which the optimiser state is keyed by:
    // resuming loads it; model.safetensors is the portable copy for other tools.
    let bpath = dir.join("model.bpk");
    let btmp = tmp_of(&bpath);
    let mut bstore = BurnpackStore::from_file(&btmp);
    model.save_into(&mut bstore).map_err(|e| ck(&btmp, e))?;
    std::fs::rename(&btmp, &bpath).map_err(|e| ck(&bpath, e))?;
    let opath = dir.join("optimizer.bpk");
    let otmp = tmp_of(&opath);
    let bytes = optim.into_bytes().map_err(|e| ck(&opath, e))?;
    std::fs::write(&otmp, &bytes[..]).map_err(|e| ck(&otmp, e))?;
    std::fs::rename(&otmp, &opath).map_err(|e| ck(&opath, e))?;
    // Last: its presence marks a complete checkpoint.
    let state = State {
        step,
        logs: logs.to_vec(),
    };
    Ok(evl_run::write_json(
        &evl_run::TrainRunDir::state_in(dir),
        &state,
    )?)
}

/// The state of a checkpoint in `dir`, if there is one.
pub fn load_state(dir: &Path) -> Result<Option<State>> {
    let p = evl_run::TrainRunDir::state_in(dir);
    if !p.exists() {
        return Ok(None);
    }
    Ok(Some(evl_run::read_json(&p)?))
}

/// Load parameters into `model`: from the burnpack (with parameter identities, for resuming)
/// when `path` ends in `.bpk`, else from safetensors.
pub fn load_module<M: Module>(mut model: M, path: &Path, _device: &Device) -> Result<M> {
    if path.extension().is_some_and(|e| e == "bpk") {
        let mut store = BurnpackStore::from_file(path);
        model.load_from(&mut store).map_err(|e| ck(path, e))?;
        Ok(model)
    } else {
        Ok(evl_infer::bundle::load_weights(model, path)?)
    }
}

/// Load optimiser state.
pub fn load_optimizer(optim: ModuleOptimizer, path: &Path) -> Result<ModuleOptimizer> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| ck(path, e))
}
