//! `evl-ecg data inspect|convert|synth|import` and `evl-ecg render`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ecg_io::{ReadOptions, Record, read_record};

use crate::args::{ConvertArgs, ConvertTo, DifficultyArg, InspectArgs, RenderArgs, SynthArgs};

fn opts(no_verify: bool) -> ReadOptions {
    ReadOptions {
        verify_checksum: !no_verify,
        ..Default::default()
    }
}

pub(crate) fn load(path: &Path, no_verify: bool) -> Result<Record> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if let Some(e @ ("png" | "jpg" | "jpeg" | "gif" | "bmp" | "tif" | "tiff" | "webp")) =
        ext.as_deref()
    {
        anyhow::bail!(
            "{} is an image ({e}), not an ECG record: this command reads WFDB (.hea + signal \
             files), PhysioNet/CinC (.hea + .mat) and EDF/EDF+ (.edf) records; images of ECG paper are what \
             `evl-ecg render` writes and what image models read during training \
             (`train --image-root`)",
            path.display()
        );
    }
    read_record(path, opts(no_verify)).with_context(|| format!("reading record {}", path.display()))
}

/// WFDB annotator names looked for beside a record (`100.atr`, `100.qrs`, ...).
const ANNOTATORS: [&str; 16] = [
    "atr", "qrs", "ecg", "ari", "pu", "pu0", "pu1", "wabp", "wqrs", "gqrsh", "gqrsl", "sqrs",
    "anI", "apn", "st", "event",
];

/// The annotation files beside a record: (file name, count, symbol counts, most frequent
/// first). An unreadable annotation file is an error naming it.
type AnnSummary = (String, usize, Vec<(String, usize)>);

fn annotations_of(path: &Path) -> Result<Vec<AnnSummary>> {
    let hea = ecg_io::wfdb::header_path(path);
    let mut out = Vec::new();
    for ext in ANNOTATORS {
        let f = hea.with_extension(ext);
        if !f.is_file() {
            continue;
        }
        let anns = ecg_io::wfdb::annotation::read_annotations(&f)
            .with_context(|| format!("reading annotations {}", f.display()))?;
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for a in &anns {
            let s = match a.symbol() {
                "" => format!("code {}", a.code),
                s => s.to_string(),
            };
            *counts.entry(s).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let name = f
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        out.push((name, anns.len(), counts));
    }
    Ok(out)
}

/// `data inspect`: one block (or JSON line) per record; bad records are reported and the
/// exit status says so, the others are still printed.
pub fn inspect(a: &InspectArgs, json: bool) -> Result<()> {
    let mut failed = 0;
    for path in &a.records {
        match load(path, a.no_verify) {
            Ok(r) => {
                let anns = match annotations_of(path) {
                    Ok(a) => a,
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e:#}");
                        Vec::new()
                    }
                };
                // No heart rate for a record without signals (an EDF+ of annotations only).
                let qrs = if r.channels.is_empty() {
                    None
                } else {
                    let sig = r.to_mv_f32();
                    let lead = r.channel_index(&ecg_io::Lead::II).unwrap_or(0);
                    let beats = ecg_signal::detect_qrs(&[&sig[lead]], r.fs, &Default::default());
                    ecg_signal::heart_rate_bpm(&beats, r.fs)
                };
                if json {
                    let line = serde_json::json!({"type": "record", "data": {
                        "path": path, "name": r.name, "fs": r.fs, "n_samples": r.n_samples,
                        "duration_s": r.duration_s(),
                        "signals": r.channels.iter().map(|c| c.description.clone()).collect::<Vec<_>>(),
                        "leads": r.channels.iter().map(|c| c.lead.name().to_string()).collect::<Vec<_>>(),
                        "gain": r.channels.iter().map(|c| c.gain).collect::<Vec<_>>(),
                        "units": r.channels.iter().map(|c| c.units.clone()).collect::<Vec<_>>(),
                        "comments": r.comments, "heart_rate_bpm": qrs,
                        "annotations": anns.iter().map(|(f, n, c)| serde_json::json!({
                            "file": f, "count": n,
                            "symbols": c.iter().map(|(s, k)| serde_json::json!([s, k])).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    }});
                    out!("{line}");
                } else {
                    out!("{}  ({})", r.name, path.display());
                    out!(
                        "  {} Hz, {} samples ({:.2} s), {} leads",
                        r.fs,
                        r.n_samples,
                        r.duration_s(),
                        r.channels.len()
                    );
                    for c in &r.channels {
                        out!(
                            "  {:5} gain {} adu/{} baseline {}{}",
                            c.description,
                            c.gain,
                            c.units,
                            c.baseline,
                            // The name as the header writes it (what `convert` writes too);
                            // the normalised lead beside it when it differs.
                            if c.description != c.lead.name() {
                                format!(" (lead {})", c.lead.name())
                            } else {
                                String::new()
                            }
                        );
                    }
                    if let Some(hr) = qrs {
                        out!("  heart rate (QRS detector): {hr:.0} bpm");
                    }
                    for (f, n, c) in &anns {
                        let top: Vec<String> =
                            c.iter().take(6).map(|(s, k)| format!("{s} {k}")).collect();
                        let more = if c.len() > 6 { ", ..." } else { "" };
                        out!("  annotations {f}: {n} ({}{more})", top.join(", "));
                    }
                    for c in &r.comments {
                        out!("  # {c}");
                    }
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} records could not be read", a.records.len());
    }
    Ok(())
}

/// `data convert`.
pub fn convert(a: &ConvertArgs) -> Result<()> {
    let r = if a.expand_frames {
        let o = ReadOptions {
            frames: ecg_io::wfdb::Frames::Expand,
            ..opts(a.no_verify)
        };
        read_record(&a.record, o)
            .with_context(|| format!("reading record {}", a.record.display()))?
    } else {
        load(&a.record, a.no_verify)?
    };
    match a.to {
        ConvertTo::Csv => {
            let mut out: Box<dyn Write> = if a.out.as_os_str() == "-" {
                Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&a.out)
                        .with_context(|| format!("creating {}", a.out.display()))?,
                ))
            };
            ecg_io::csv::write_csv(&r, a.adc, &mut out)
                .with_context(|| format!("writing {}", a.out.display()))?;
        }
        ConvertTo::Wfdb => {
            ecg_io::write_record(&a.out, &r, 16)
                .with_context(|| format!("writing {} into {}", r.name, a.out.display()))?;
        }
    }
    Ok(())
}

/// `data synth`.
pub fn synth(a: &SynthArgs, json: bool) -> Result<()> {
    let cfg = ecg_synth::SynthConfig {
        fs: a.fs,
        duration_s: a.duration,
        class_weights: [
            a.class_weights[0],
            a.class_weights[1],
            a.class_weights[2],
            a.class_weights[3],
            a.class_weights[4],
        ],
        difficulty: match a.difficulty {
            DifficultyArg::Obvious => ecg_synth::Difficulty::Obvious,
            DifficultyArg::Subtle => ecg_synth::Difficulty::Subtle,
            DifficultyArg::Mixed => ecg_synth::Difficulty::Mixed,
        },
        noise: a.noise,
        mains_hz: a.mains,
        ..Default::default()
    };
    if cfg.class_weights.iter().any(|w| *w < 0.0) || cfg.class_weights.iter().sum::<f64>() <= 0.0 {
        bail!("--class-weights must be non-negative with a positive sum");
    }
    let t = std::time::Instant::now();
    let truths = ecg_synth::write_dataset(&a.out, &cfg, a.seed, a.n)
        .with_context(|| format!("writing synthetic records to {}", a.out.display()))?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for t in &truths {
        for c in &t.superclasses {
            *counts.entry(c.clone()).or_default() += 1;
        }
    }
    if json {
        out!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"out": a.out, "n": a.n, "seed": a.seed,
                "superclass_counts": counts, "seconds": t.elapsed().as_secs_f64()}})
        );
    } else {
        eprintln!(
            "wrote {} SYNTHETIC records + labels.csv to {} in {:.2} s; superclasses: {:?}",
            a.n,
            a.out.display(),
            t.elapsed().as_secs_f64(),
            counts
        );
    }
    Ok(())
}

/// `render`.
pub fn render(a: &RenderArgs) -> Result<()> {
    let r = load(&a.record, a.no_verify)?;
    let synthetic = r.comments.iter().any(|c| c.contains("SYNTHETIC"));
    let cfg = ecg_render::RenderConfig {
        dpi: a.dpi,
        paper_mm: (a.width_mm, a.height_mm),
        grayscale: a.grayscale,
        grid: !a.no_grid,
        banner: synthetic.then(|| "SYNTHETIC".to_string()),
        distortions: ecg_render::Distortions {
            rotation_deg: a.rotate,
            noise_sd: a.noise,
            color_jitter: a.color_jitter,
            creases: a.creases,
            blur_px: a.blur,
            seed: a.seed,
        },
        ..Default::default()
    };
    let renderer = ecg_render::Renderer::new(cfg).context("render settings")?;
    ecg_render::render_png(&renderer, &r, &a.out)
        .with_context(|| format!("rendering {}", a.record.display()))?;
    let (w, h) = renderer.size();
    eprintln!("wrote {} ({w}x{h})", a.out.display());
    Ok(())
}

/// `data import ptbxl`: index a PTB-XL tree; every record is opened once to check it reads.
pub fn import_ptbxl(a: &crate::args::ImportPtbxlArgs, json: bool) -> Result<()> {
    if a.rate != 100 && a.rate != 500 {
        bail!("--rate must be 100 or 500 (PTB-XL ships records100/ and records500/)");
    }
    let tree = ecg_io::labels::ptbxl::PtbxlTree::open(&a.dir, Some(&a.database))
        .with_context(|| format!("opening PTB-XL tree {}", a.dir.display()))?;
    let mut ds = ecg_data::Dataset::from_ptbxl(&tree, a.rate, a.headers)
        .with_context(|| format!("indexing {}", a.dir.display()))?;
    // Record paths in the index are relative to the index file: rewrite them to absolute
    // paths of the tree so the index can live anywhere.
    let root =
        std::fs::canonicalize(&a.dir).with_context(|| format!("resolving {}", a.dir.display()))?;
    let mut bad = 0;
    for e in &mut ds.entries {
        let rel = e.record.take().expect("PTB-XL entries have records");
        let abs = root.join(&rel);
        if let Err(err) = read_record(&abs, opts(a.no_verify)) {
            bad += 1;
            eprintln!("error: {}: {err}", e.id);
        }
        e.record = Some(abs);
    }
    ds.root = root;
    ds.write_index(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for e in &ds.entries {
        for l in &e.labels {
            *counts.entry(l.as_str()).or_default() += 1;
        }
    }
    if json {
        out!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"out": a.out, "entries": ds.entries.len(), "unreadable": bad, "superclass_counts": counts}})
        );
    } else {
        eprintln!(
            "indexed {} PTB-XL records ({} Hz) into {}; superclasses {:?}",
            ds.entries.len(),
            a.rate,
            a.out.display(),
            counts
        );
    }
    if bad > 0 {
        bail!("{bad} records could not be read (listed above); the index still lists them");
    }
    Ok(())
}
