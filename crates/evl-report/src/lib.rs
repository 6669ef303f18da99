//! Reports people want to look at: one self-contained, offline HTML page (figures inlined as
//! SVG, the ECG as an embedded PNG, no scripts, no network) plus the figures as files, from a
//! run directory written by `evl-ecg quickstart` or `evl-ecg eval --out`.
//!
//! What it reads, every file through its type in `evl-run` (each part is drawn when its file
//! is there; a file that is there but does not read as its type is an error naming it):
//! - `results.json` (quickstart: label space) with `report.md` (its tables), or
//!   `metrics.json` (eval: scores, per class, perturbations);
//! - `runs/*/metrics.jsonl`: training curves per loss term;
//! - `predictions/evl-seed0.jsonl` or `predictions.jsonl`: ROC and PR curves per class and the
//!   reliability diagram, and the first record's answer drawn under its rendered ECG;
//! - `analysis.json`: the Sinkhorn transport plan heatmap (the paper's Figure 2) and the
//!   singular-value spectra of teacher and student features (Figure 3).
//!
//! Knows nothing of models or tensors: it reads files and draws.

pub mod figures;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use evl_run::{Analysis, DatasetEval, PredLine, RunDir, StepLog};
use figures::Series;

/// Errors of report writing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// File access.
    #[error("cannot access {}", .path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A run-directory file that is missing its type, version or a field.
    #[error(transparent)]
    Run(#[from] evl_run::Error),
    /// Nothing to report.
    #[error("{}: {what}", .path.display())]
    Empty {
        /// Run directory.
        path: PathBuf,
        /// What was looked for.
        what: String,
    },
    /// Drawing failed.
    #[error("plotting: {0}")]
    Plot(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`write_report`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// The HTML page.
    pub html: PathBuf,
    /// Figure files (SVG, PNG).
    pub figures: Vec<PathBuf>,
    /// Parts skipped because their input is missing.
    pub skipped: Vec<String>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn markdown(md: &str) -> String {
    let mut opts = pulldown_cmark::Options::empty();
    opts.insert(pulldown_cmark::Options::ENABLE_TABLES);
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, pulldown_cmark::Parser::new_ext(md, opts));
    html
}

/// A page under construction: sections of HTML plus the figure files written.
struct Page {
    dir: PathBuf,
    body: String,
    figures: Vec<PathBuf>,
    skipped: Vec<String>,
}

impl Page {
    fn figure(&mut self, file: &str, svg: String, caption: &str) -> Result<()> {
        let path = self.dir.join("figures").join(file);
        std::fs::write(&path, &svg).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        self.figures.push(path);
        let _ = write!(
            self.body,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            esc(caption)
        );
        Ok(())
    }
}

/// Write `index.html` and `figures/` for the run in `run` into `out` (default `run/report`).
pub fn write_report(run: &Path, out: Option<&Path>) -> Result<Written> {
    let dir = out.map_or_else(|| run.join("report"), Path::to_path_buf);
    std::fs::create_dir_all(dir.join("figures")).map_err(|source| Error::Io {
        path: dir.join("figures"),
        source,
    })?;
    let mut page = Page {
        dir: dir.clone(),
        body: String::new(),
        figures: Vec::new(),
        skipped: Vec::new(),
    };
    let rd = RunDir::new(run);
    let results = rd.results();
    let metrics = rd.eval_metrics();
    let mut eval: Option<DatasetEval> = None;
    let (title, space, data_dir) = if results.is_file() {
        let r: evl_run::Results = evl_run::read_json(&results)?;
        ("evl-ecg quickstart report", r.space, Some(rd.data()))
    } else if metrics.is_file() {
        let m: DatasetEval = evl_run::read_json(&metrics)?;
        let (space, data) = (m.space.clone(), Some(m.data.clone()));
        eval = Some(m);
        ("evl-ecg evaluation report", space, data)
    } else {
        return Err(Error::Empty {
            path: run.to_path_buf(),
            what: "neither results.json (quickstart) nor metrics.json (eval --out) is here".into(),
        });
    };
    // 1. Tables.
    page.body.push_str("<section><h2>Tables</h2>\n");
    if rd.report_md().is_file() {
        let md = read(&rd.report_md())?;
        // The page has its own title.
        let md: String = md
            .lines()
            .filter(|l| !l.starts_with("# "))
            .collect::<Vec<_>>()
            .join("\n");
        page.body.push_str(&markdown(&md));
    } else if let Some(m) = &eval {
        page.body.push_str(&markdown(&eval_tables(m)));
    }
    page.body.push_str("</section>\n");
    // 2. Training curves.
    training_curves(run, &mut page)?;
    // 3. ROC, PR, reliability, and the ECG with its answer.
    let main = [rd.predictions("evl-seed0"), rd.eval_predictions()]
        .into_iter()
        .find(|p| p.is_file());
    match (&main, space.is_empty()) {
        (Some(p), false) => {
            let lines: Vec<PredLine> = evl_run::read_jsonl(p)?;
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string();
            curves(&lines, &space, &name, &mut page)?;
            if let Some(d) = &data_dir {
                ecg_with_answer(&lines, &space, d, &mut page)?;
            }
        }
        _ => page
            .skipped
            .push("ROC/PR/reliability: no predictions file with a known label space".into()),
    }
    // 4. Method figures.
    let analysis = rd.analysis();
    if analysis.is_file() {
        method_figures(&evl_run::read_json(&analysis)?, &mut page)?;
    } else {
        page.skipped
            .push("transport plan and spectra: no analysis.json (written by quickstart)".into());
    }
    if !page.skipped.is_empty() {
        page.body.push_str("<section><h2>Not drawn</h2><ul>");
        for s in &page.skipped {
            let _ = write!(page.body, "<li>{}</li>", esc(s));
        }
        page.body.push_str("</ul></section>\n");
    }
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{CSS}</style></head><body>\
         <header><h1>{title}</h1><p class=\"src\">Run directory: <code>{}</code>. \
         Offline page: no scripts, nothing loaded from elsewhere.</p></header>\n{}\
         </body></html>\n",
        esc(&run.display().to_string()),
        page.body
    );
    let html_path = dir.join("index.html");
    ecg_io::wfdb::atomic_write(&html_path, html.as_bytes()).map_err(|e| Error::Io {
        path: html_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Written {
        html: html_path,
        figures: page.figures,
        skipped: page.skipped,
    })
}

const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:1120px;margin:24px auto;\
padding:0 16px;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;\
margin-top:32px}table{border-collapse:collapse;font-size:13px;margin:8px 0}\
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}\
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:8px;\
vertical-align:top}figcaption{font-size:12px;color:#555;max-width:520px}.src{color:#666}\
.answer{font-family:monospace;background:#f6f6f6;padding:8px;border-radius:4px}\
img.ecg{max-width:100%;border:1px solid #ddd}";

fn f3(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.3}"))
}

/// Markdown tables of an eval run's metrics.json.
fn eval_tables(m: &DatasetEval) -> String {
    let s = &m.scores;
    let mut md = format!(
        "{} records ({} split) of `{}`, model `{}`.\n\n",
        m.n,
        m.split,
        m.data.display(),
        m.model.display()
    );
    if s.ignores_input() {
        let _ = write!(
            md,
            "**Warning: this model's probabilities do not depend on the record** (largest \
             per-class standard deviation across records {:.1e}): it answers every ECG alike, \
             and the scores below measure ties, not reading.\n\n",
            s.prob_spread.unwrap_or(0.0)
        );
    }
    md.push_str("| metric | value |\n|---|---|\n");
    for (v, label) in [
        (s.macro_auc, "macro ROC AUC"),
        (s.macro_ap, "macro PR AUC"),
        (Some(s.fmax), "Fmax"),
        (Some(s.macro_f1_at_05), "macro F1 at 0.5"),
        (Some(s.ece), "ECE (10 bins)"),
        (Some(s.parity_f1), "ECG-Bench parity F1 (generated answers)"),
        (
            s.parity_auc_binary,
            "ECG-Bench parity \"AUC\" of 0/1 answers",
        ),
    ] {
        let _ = writeln!(md, "| {label} | {} |", f3(v));
    }
    let _ = writeln!(
        md,
        "| macro F1 at validation thresholds | {} |",
        f3(m.macro_f1_at_val_thresholds)
    );
    md.push_str("\n| class | positives | ROC AUC | AP |\n|---|---|---|---|\n");
    for c in &m.per_class {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            c.label,
            c.positives,
            f3(c.auc),
            f3(c.ap)
        );
    }
    if !m.perturbations.is_empty() {
        md.push_str("\n## Robustness (change under perturbation, 95% paired bootstrap CI)\n\n| perturbation | metric | clean | perturbed | change | 95% CI |\n|---|---|---|---|---|---|\n");
        for p in &m.perturbations {
            for d in &p.deltas {
                let ci = d.ci95.map_or("n/a".into(), |(lo, hi)| {
                    format!("{} .. {}", f3(Some(lo)), f3(Some(hi)))
                });
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {ci} |",
                    p.spec,
                    d.metric,
                    f3(d.clean),
                    f3(d.perturbed),
                    f3(d.delta)
                );
            }
        }
    }
    md
}

fn training_curves(run: &Path, page: &mut Page) -> Result<()> {
    let runs_dir = RunDir::new(run).runs_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&runs_dir)
        .map(|rd| {
            rd.filter_map(|e| {
                e.ok()
                    .map(|e| evl_run::TrainRunDir::new(e.path()).step_logs())
            })
            .filter(|p| p.is_file())
            .collect()
        })
        .unwrap_or_default();
    files.sort();
    // One seed keeps the panels legible; every seed's numbers are in the tables.
    let seed0: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("-seed0"))
        .collect();
    let use_files: Vec<&PathBuf> = if seed0.is_empty() {
        files.iter().collect()
    } else {
        seed0
    };
    if use_files.is_empty() {
        page.skipped
            .push("training curves: no runs/*/metrics.jsonl".into());
        return Ok(());
    }
    // term -> run -> points
    let mut terms: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for f in use_files {
        let run_name = f
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .unwrap_or("run")
            .to_string();
        let mut per: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for v in evl_run::read_jsonl::<StepLog>(f)? {
            let step = v.step as f64;
            let fixed = [("total".to_string(), v.total), ("ce".to_string(), v.ce)];
            for (name, x) in fixed.into_iter().chain(v.terms) {
                per.entry(name).or_default().push((step, x));
            }
        }
        for (k, points) in per {
            terms.entry(k).or_default().push(Series {
                name: run_name.clone(),
                points,
            });
        }
    }
    page.body.push_str(
        "<section><h2>Training curves</h2><p>Each loss term per optimiser step \
         (seed 0 of each run; log scale).</p>\n",
    );
    for (term, series) in &terms {
        let svg = figures::lines(
            &format!("loss term: {term}"),
            "step",
            term,
            series,
            true,
            false,
        )?;
        page.figure(
            &format!("curve-{term}.svg"),
            svg,
            &format!("{term} per step, one line per run"),
        )?;
    }
    page.body.push_str("</section>\n");
    Ok(())
}

fn column(lines: &[PredLine], space: &[String], c: usize) -> (Vec<bool>, Vec<f64>) {
    lines
        .iter()
        .map(|l| {
            (
                l.gold.contains(&space[c]),
                l.probs.get(c).copied().unwrap_or(f64::NAN),
            )
        })
        .unzip()
}

fn curves(lines: &[PredLine], space: &[String], name: &str, page: &mut Page) -> Result<()> {
    use evl_eval::continuous::{
        average_precision, expected_calibration_error, pr_curve, roc_curve,
    };
    let mut roc = Vec::new();
    let mut pr = Vec::new();
    for (c, label) in space.iter().enumerate() {
        let (y, s) = column(lines, space, c);
        if let Some(pts) = roc_curve(&y, &s) {
            let auc = evl_eval::roc_auc(&y, &s).unwrap_or(f64::NAN);
            roc.push(Series {
                name: format!("{label} (AUC {auc:.2})"),
                points: pts,
            });
        }
        if let Some(pts) = pr_curve(&y, &s) {
            let ap = average_precision(&y, &s).unwrap_or(f64::NAN);
            pr.push(Series {
                name: format!("{label} (AP {ap:.2})"),
                points: pts,
            });
        }
    }
    let _ = write!(
        page.body,
        "<section><h2>Per-class curves and calibration ({})</h2><p>{} records. Probabilities are \
         p(yes) of the verification question for each label. Classes with a single gold value \
         have no ROC curve.</p>",
        esc(name),
        lines.len()
    );
    page.figure(
        "roc.svg",
        figures::lines(
            "ROC per class",
            "false positive rate",
            "true positive rate",
            &roc,
            false,
            true,
        )?,
        "ROC curves per class; the diagonal is chance.",
    )?;
    page.figure(
        "pr.svg",
        figures::lines(
            "Precision-recall per class",
            "recall",
            "precision",
            &pr,
            false,
            true,
        )?,
        "Precision-recall curves per class (step-wise area = average precision).",
    )?;
    let (y, s): (Vec<bool>, Vec<f64>) = (0..space.len())
        .flat_map(|c| {
            let (y, s) = column(lines, space, c);
            y.into_iter().zip(s)
        })
        .unzip();
    let (ece, bins) = expected_calibration_error(&y, &s, 10);
    let pts: Vec<(f64, f64, usize)> = bins
        .iter()
        .map(|b| (b.confidence, b.frequency, b.count))
        .collect();
    page.figure(
        "reliability.svg",
        figures::reliability(&format!("Reliability (ECE {ece:.3})"), &pts)?,
        "Reliability diagram over every per-label probability, 10 equal-width bins; circle \
         area grows with the bin's count; the diagonal is perfect calibration.",
    )?;
    page.body.push_str("</section>\n");
    Ok(())
}

fn ecg_with_answer(
    lines: &[PredLine],
    space: &[String],
    data: &Path,
    page: &mut Page,
) -> Result<()> {
    let Some(first) = lines.first() else {
        return Ok(());
    };
    let direct = data.join(&first.question_id);
    let path = if direct.with_extension("hea").is_file() || direct.with_extension("mat").is_file() {
        Some(direct)
    } else {
        let want = format!("{}.hea", first.question_id);
        walk_find(data, &want).map(|p| p.with_extension(""))
    };
    let Some(path) = path else {
        page.skipped.push(format!(
            "rendered ECG: record `{}` not found under {}",
            first.question_id,
            data.display()
        ));
        return Ok(());
    };
    let rec = match ecg_io::read_record(&path, ecg_io::ReadOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            page.skipped
                .push(format!("rendered ECG: {}: {e}", path.display()));
            return Ok(());
        }
    };
    let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: 80.0,
        ..Default::default()
    })
    .map_err(|e| Error::Plot(e.to_string()))?;
    let png = page.dir.join("figures/ecg.png");
    ecg_render::render_png(&renderer, &rec, &png).map_err(|e| Error::Plot(e.to_string()))?;
    let bytes = std::fs::read(&png).map_err(|source| Error::Io {
        path: png.clone(),
        source,
    })?;
    page.figures.push(png);
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let probs: Vec<String> = space
        .iter()
        .zip(&first.probs)
        .map(|(l, p)| format!("{l} {p:.2}"))
        .collect();
    let _ = write!(
        page.body,
        "<section><h2>One record and the model's answer</h2>\
         <img class=\"ecg\" alt=\"ECG {id}\" src=\"data:image/png;base64,{b64}\">\
         <p class=\"answer\">record <b>{id}</b><br>model answer: {ans}<br>gold labels: {gold}<br>\
         per-label probabilities: {probs}</p></section>",
        id = esc(&first.question_id),
        ans = if first.text.is_empty() {
            "(empty answer)".to_string()
        } else {
            esc(&first.text)
        },
        gold = esc(&first.gold.join(", ")),
        probs = esc(&probs.join(", ")),
    );
    Ok(())
}

fn walk_find(dir: &Path, name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            subdirs.push(p);
        } else if p.file_name().and_then(|s| s.to_str()) == Some(name) {
            return Some(p);
        }
    }
    subdirs.sort();
    subdirs.into_iter().find_map(|d| walk_find(&d, name))
}

fn method_figures(a: &Analysis, page: &mut Page) -> Result<()> {
    page.body
        .push_str("<section><h2>What distillation aligns</h2>\n");
    if let Some(p) = &a.plan {
        let (rows, cols, v) = (p.rows, p.cols, &p.plan);
        if v.len() != rows * cols {
            return Err(Error::Empty {
                path: page.dir.clone(),
                what: format!(
                    "analysis.json: the plan has {} entries for {rows} x {cols} tokens",
                    v.len()
                ),
            });
        }
        page.figure(
            "transport-plan.svg",
            figures::heatmap(
                &format!("Sinkhorn plan, record {}", p.example),
                "student visual token",
                "teacher visual token",
                rows,
                cols,
                v,
            )?,
            &format!(
                "Entropic OT plan (eps {}, {} iterations) between the {rows} projected \
                 teacher visual tokens and the {cols} visual tokens of the EVL-ECG student, \
                 seed 0 (as the paper's Figure 2); colour from the smallest entry ({:.2e}, \
                 white) to the largest ({:.2e}, dark), uniform would be {:.2e}. Transport \
                 cost {}.",
                p.eps,
                p.n_iter,
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(f64::MIN, f64::max),
                1.0 / (rows * cols) as f64,
                f3(Some(p.cost))
            ),
        )?;
    }
    let spectra: Vec<Series> = a
        .spectra
        .iter()
        .map(|s| Series {
            name: format!(
                "{} (eff. rank {:.1} of {})",
                s.model, s.effective_rank, s.width
            ),
            points: s
                .singular_values
                .iter()
                .enumerate()
                // Below 1e-4 of the top value is rounding noise of the eigensolver.
                .map(|(i, &v)| ((i + 1) as f64, v))
                .filter(|p| p.1 >= 1e-4)
                .collect(),
        })
        .collect();
    if !spectra.is_empty() {
        page.figure(
            "spectra.svg",
            figures::lines(
                "Singular values of visual features",
                "index",
                "sigma / sigma_1",
                &spectra,
                true,
                false,
            )?,
            "Singular values of each model's centred visual-token matrix over the test records, \
             normalised by the largest (as the paper's Figure 3); effective rank is \
             exp(entropy) of the normalised spectrum.",
        )?;
    }
    page.body.push_str("</section>\n");
    Ok(())
}
