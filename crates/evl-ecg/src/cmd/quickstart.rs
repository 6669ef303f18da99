//! `evl-ecg quickstart`.

use std::path::Path;

use anyhow::{Context, Result};
use evl_models::DeviceSpec;
use evl_train::quickstart::{Preset, QuickstartConfig, run as run_quickstart};

use crate::args::{PresetArg, QuickstartArgs};

/// `quickstart`.
pub fn run(a: &QuickstartArgs, json: bool) -> Result<()> {
    let preset = match a.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Quick => Preset::Quick,
        PresetArg::Full => Preset::Full,
    };
    let cfg = QuickstartConfig::preset(preset);
    let spec: DeviceSpec = a.device.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let device = spec.device().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let train_device = device.clone().autodiff();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let shared = shared.is_dir().then_some(shared);
    if shared.is_none() {
        eprintln!("note: ../shared/data not found; the real-record evaluation is skipped");
    }
    let t = std::time::Instant::now();
    let r = run_quickstart(&a.out, &cfg, shared.as_deref(), &train_device, &device, |msg| {
        if json {
            println!("{}", serde_json::json!({"type": "progress", "data": {"message": msg, "seconds": t.elapsed().as_secs_f64()}}));
        } else {
            eprintln!("[{:6.1}s] {msg}", t.elapsed().as_secs_f64());
        }
    })
    .with_context(|| format!("quickstart into {}", a.out.display()))?;
    if json {
        println!("{}", serde_json::json!({"type": "summary", "data": {"out": a.out, "wall_seconds": r.wall_seconds}}));
    } else {
        eprintln!("wrote {}/report.md and results.json in {:.0} s", a.out.display(), r.wall_seconds);
    }
    Ok(())
}
