//! `evl-ecg bench io` and `evl-ecg bench render`: records read and images drawn per second,
//! ours against wfdb-python and a matplotlib renderer measured in the same invocation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use crate::args::{IoArgs as BenchIoArgs, RenderArgs as BenchRenderArgs};

/// `../shared/data` (the project's shared records) when it is there: `EVL_SHARED_DATA`, else
/// `../shared/data` from the working directory (the repository root).
pub(crate) fn shared_data() -> Option<PathBuf> {
    ecg_data::shared_data()
}

pub(crate) fn run_python(
    python: &str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<serde_json::Value, String> {
    let mut child = Command::new(python)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {python}: {e}"))?;
    if let Some(s) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(s.as_bytes())
            .map_err(|e| e.to_string())?;
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("bad reference output: {e}"))
}

fn emit(json: bool, name: &str, ours: f64, unit: &str, reference: Option<(&str, f64)>) {
    match (json, reference) {
        (true, r) => println!(
            "{}",
            serde_json::json!({"type": "bench", "data": {"case": name, "ours": ours, "unit": unit,
                "reference": r.map(|x| x.0), "reference_value": r.map(|x| x.1),
                "speedup": r.map(|x| ours / x.1)}})
        ),
        (false, Some((rn, rv))) => println!(
            "{name:40} ours {ours:10.1} {unit}   {rn} {rv:10.1} {unit}   x{:.1}",
            ours / rv
        ),
        (false, None) => println!("{name:40} ours {ours:10.1} {unit}"),
    }
}

/// `bench io`.
pub fn io(a: &BenchIoArgs, json: bool) -> Result<()> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => shared_data().context("no --dir given and ../shared/data is absent")?,
    };
    if a.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build_global()
            .ok();
    }
    let mut paths: Vec<String> = ecg_data::walk(&dir, "hea")
        .into_iter()
        .map(|p| p.with_extension("").to_string_lossy().to_string())
        .collect();
    if paths.is_empty() {
        bail!("no .hea files under {}", dir.display());
    }
    let opts = ecg_io::ReadOptions::default();
    let read_all = |p: &String| -> Result<usize> {
        let r = ecg_io::read_record(Path::new(p), opts).with_context(|| p.clone())?;
        // Physical values in f64 for every sample, as rdrecord returns them.
        let p: Vec<Vec<f64>> = r.channels.iter().map(|c| c.physical()).collect();
        Ok(p.iter().map(Vec::len).sum())
    };
    // Untimed pass: warms the page cache like the reference's own, and leaves out, on both
    // sides and by name, the records our readers refuse (formats not supported yet).
    let mut refused = Vec::new();
    paths.retain(|p| match read_all(p) {
        Ok(_) => true,
        Err(e) => {
            refused.push(format!("{e:#}"));
            false
        }
    });
    if !refused.is_empty() {
        eprintln!(
            "note: {} records refused by our readers, left out on both sides:",
            refused.len()
        );
        for r in &refused {
            eprintln!("  {r}");
        }
    }
    if paths.is_empty() {
        bail!("no readable record under {}", dir.display());
    }
    let mut reference = None;
    if !a.no_python {
        let scripts = crate::scripts::Scripts::write()?;
        match run_python(
            &a.python,
            &[
                scripts
                    .path(crate::scripts::WFDB_READ)
                    .to_str()
                    .unwrap_or_default(),
                &a.reps.to_string(),
            ],
            Some(serde_json::to_string(&paths).expect("strings")),
        ) {
            Ok(v) => {
                let ok: Vec<String> = serde_json::from_value(v["ok"].clone()).unwrap_or_default();
                if let Some(f) = v["failed"].as_object().filter(|f| !f.is_empty()) {
                    eprintln!(
                        "wfdb-python could not read {} records (left out on both sides): {:?}",
                        f.len(),
                        f.keys().collect::<Vec<_>>()
                    );
                }
                paths = ok;
                reference = v["best_s"].as_f64().map(|s| {
                    (
                        format!("wfdb-python {}", v["wfdb_version"].as_str().unwrap_or("")),
                        s,
                    )
                });
            }
            Err(e) => eprintln!(
                "note: wfdb-python reference not run ({e}); install with `python3 -m pip install -r crates/evl-bench/scripts/requirements.txt`"
            ),
        }
    }
    let mut best = f64::INFINITY;
    let mut samples = 0;
    for _ in 0..a.reps.max(1) {
        let t = Instant::now();
        samples = 0;
        for p in &paths {
            samples += read_all(p)?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mut best_par = f64::INFINITY;
    for _ in 0..a.reps.max(1) {
        let t = Instant::now();
        paths.par_iter().map(read_all).collect::<Result<Vec<_>>>()?;
        best_par = best_par.min(t.elapsed().as_secs_f64());
    }
    let n = paths.len() as f64;
    if !json {
        println!(
            "{} records, {:.1} M samples, physical values (f64) as rdrecord returns",
            paths.len(),
            samples as f64 / 1e6
        );
    }
    let rname = reference.as_ref().map(|r| r.0.clone());
    emit(
        json,
        "read records, 1 thread",
        n / best,
        "records/s",
        rname.as_deref().zip(reference.as_ref().map(|r| n / r.1)),
    );
    emit(
        json,
        &format!("read records, {} threads", rayon::current_num_threads()),
        n / best_par,
        "records/s",
        rname.as_deref().zip(reference.as_ref().map(|r| n / r.1)),
    );
    // The layouts and formats wfdb-python's corpus adds, each against its reference in the
    // same run: multi-segment and FLAC records (wfdb-python), EDF files (MNE-Python).
    let header_of =
        |p: &String| ecg_io::wfdb::Header::read(&Path::new(p).with_extension("hea")).ok();
    let multi: Vec<String> = paths
        .iter()
        .filter(|p| header_of(p).is_some_and(|h| !h.segments.is_empty()))
        .cloned()
        .collect();
    let flac: Vec<String> = paths
        .iter()
        .filter(|p| {
            header_of(p).is_some_and(|h| {
                h.signals
                    .iter()
                    .any(|s| ecg_io::wfdb::format::is_flac(s.format))
            })
        })
        .cloned()
        .collect();
    let edf: Vec<String> = ecg_data::walk(&dir, "edf")
        .into_iter()
        .map(|p| p.to_string_lossy().to_string())
        .filter(|p| read_all(p).is_ok())
        .collect();
    for (label, list, mode) in [
        ("multi-segment records", &multi, "wfdb"),
        ("FLAC records", &flac, "wfdb"),
        ("EDF files", &edf, "edf"),
    ] {
        if list.is_empty() {
            continue;
        }
        let mut best = f64::INFINITY;
        for _ in 0..a.reps.max(1) {
            let t = Instant::now();
            for p in list.iter() {
                read_all(p)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut reference = None;
        if !a.no_python {
            let scripts = crate::scripts::Scripts::write()?;
            let script = scripts.path(crate::scripts::WFDB_READ);
            let reps = a.reps.to_string();
            let mut args = vec![script.to_str().unwrap_or_default(), reps.as_str()];
            if mode == "edf" {
                args.push("--edf");
            }
            match run_python(
                &a.python,
                &args,
                Some(serde_json::to_string(list).expect("strings")),
            ) {
                Ok(v) if v["failed"].as_object().is_none_or(|f| f.is_empty()) => {
                    reference = v["best_s"].as_f64().map(|s| {
                        let who = if mode == "edf" { "MNE" } else { "wfdb-python" };
                        (format!("{who} {}", v["version"].as_str().unwrap_or("")), s)
                    });
                }
                Ok(v) => eprintln!(
                    "note: the reference could not read some {label}: {}",
                    v["failed"]
                ),
                Err(e) => eprintln!("note: reference for {label} not run ({e})"),
            }
        }
        let n = list.len() as f64;
        emit(
            json,
            &format!("read {label} ({}), 1 thread", list.len()),
            n / best,
            "records/s",
            reference.as_ref().map(|r| (r.0.as_str(), n / r.1)),
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"records": paths.len()}})
        );
    }
    Ok(())
}

/// `bench render`.
pub fn render(a: &BenchRenderArgs, json: bool) -> Result<()> {
    let n = a.n.max(1);
    let recs = ecg_synth::generate_many(&ecg_synth::SynthConfig::default(), 0, n);
    let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: a.dpi,
        ..Default::default()
    })
    .context("renderer")?;
    let (w, h) = renderer.size();
    let mut img = renderer.render(&recs[0].record)?;
    let t = Instant::now();
    for r in &recs {
        img = renderer.render(&r.record)?;
    }
    let one = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    recs.par_iter()
        .map(|r| renderer.render(&r.record).map(|_| ()))
        .collect::<Result<Vec<_>, _>>()?;
    let par = n as f64 / t.elapsed().as_secs_f64();
    let m = n.min(40);
    let t = Instant::now();
    for r in &recs[..m] {
        let im = renderer.render(&r.record)?;
        let mut buf = std::io::Cursor::new(Vec::new());
        im.write_to(&mut buf, image::ImageFormat::Png)
            .context("png")?;
    }
    let png = m as f64 / t.elapsed().as_secs_f64();
    drop(img);
    let mut reference = None;
    if !a.no_python {
        let scripts = crate::scripts::Scripts::write()?;
        let tmp = std::env::temp_dir().join(format!("evl-ecg-bench-render-{}", std::process::id()));
        ecg_synth::write_dataset(&tmp, &ecg_synth::SynthConfig::default(), 0, m.min(20))?;
        match run_python(
            &a.python,
            &[
                scripts
                    .path(crate::scripts::MPL_RENDER)
                    .to_str()
                    .unwrap_or_default(),
                &tmp.to_string_lossy(),
                &a.dpi.to_string(),
                &m.min(20).to_string(),
            ],
            None,
        ) {
            Ok(v) => reference = v["best_s_per_image"].as_f64().map(|s| 1.0 / s),
            Err(e) => eprintln!("note: matplotlib reference not run ({e})"),
        }
        std::fs::remove_dir_all(&tmp).ok();
    }
    if !json {
        println!("{w}x{h} px at {} dpi, 3x4 + rhythm strip, red grid", a.dpi);
    }
    let r = reference.map(|v| ("matplotlib (PNG)", v));
    emit(json, "render in memory, 1 thread", one, "images/s", r);
    emit(
        json,
        &format!("render in memory, {} threads", rayon::current_num_threads()),
        par,
        "images/s",
        r,
    );
    emit(json, "render + PNG encode, 1 thread", png, "images/s", r);
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"width": w, "height": h}})
        );
    }
    Ok(())
}
