//! `evl-ecg bench serve`: the service under load on loopback, against the reference of the
//! same engine called directly (no HTTP, no queue) with the same number of threads, measured
//! in the same run.
//!
//! Phases: (1) the direct engine, `workers` threads, for `--duration` s; (2) the service below
//! saturation: as many closed-loop clients as workers, for `--duration` s (every request must
//! succeed); (3) above saturation: `--over` times (workers + queue) clients (only 200 and 503
//! allowed); (4) a soak at the phase-2 load for `--soak` s, sampling the process's resident
//! memory each second (it must stay flat). Clients open one connection per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use evl_serve::client::{self, Part};

/// Arguments of `bench serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Model directory served (default: the shipped teacher).
    #[arg(long, default_value = "zoo/teacher/model")]
    pub model: std::path::PathBuf,
    /// Directory of WFDB records sent (default: ../shared/data/ptbxl_subset/records500;
    /// without it, SYNTHETIC records sent as CSV).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Inference workers (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Queue capacity of the service.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of the memory soak.
    #[arg(long, default_value_t = 30.0)]
    pub soak: f64,
    /// Clients above saturation, as a multiple of workers + queue.
    #[arg(long, default_value_t = 3)]
    pub over: usize,
}

/// One request's files and fields, with the record they hold (for the direct reference).
struct Upload {
    body: Vec<Vec<(String, Vec<u8>)>>,
    fields: Vec<(String, String)>,
    record: ecg_io::Record,
}

fn uploads(a: &ServeArgs) -> Result<(Vec<Upload>, &'static str)> {
    let dir = match &a.data {
        Some(d) => Some(d.clone()),
        None => crate::data::shared_data().map(|d| d.join("ptbxl_subset/records500")),
    };
    let mut out = Vec::new();
    if let Some(dir) = dir.filter(|d| d.is_dir()) {
        let mut heads: Vec<_> = walk(&dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "hea"))
            .collect();
        heads.sort();
        for h in heads.into_iter().take(20) {
            let stem = h.with_extension("");
            let record = ecg_io::read_record(&stem, ecg_io::ReadOptions::default())
                .with_context(|| format!("reading {}", stem.display()))?;
            let header = ecg_io::wfdb::Header::read(&h)?;
            let mut files = vec![(file_name(&h), std::fs::read(&h)?)];
            for f in header.signals.iter().map(|s| s.file.clone()) {
                if !files.iter().any(|(n, _)| *n == f) {
                    files.push((f.clone(), std::fs::read(h.with_file_name(&f))?));
                }
            }
            out.push(Upload {
                body: vec![files],
                fields: Vec::new(),
                record,
            });
        }
        if !out.is_empty() {
            return Ok((out, "PTB-XL records (WFDB)"));
        }
    }
    for seed in 0..20 {
        let cfg = ecg_synth::SynthConfig {
            fs: 500,
            ..Default::default()
        };
        let record = ecg_synth::generate(&cfg, 77, seed).record;
        let mut csv = Vec::new();
        ecg_io::csv::write_csv(&record, false, &mut csv)?;
        out.push(Upload {
            body: vec![vec![(format!("synthetic{seed}.csv"), csv)]],
            fields: vec![("fs".into(), "500".into())],
            record,
        });
    }
    Ok((out, "SYNTHETIC records (CSV)"))
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn send(addr: SocketAddr, u: &Upload) -> std::io::Result<client::Response> {
    let mut parts: Vec<Part<'_>> = u.body[0].iter().map(|(n, b)| Part::File(n, b)).collect();
    parts.extend(u.fields.iter().map(|(k, v)| Part::Field(k, v)));
    client::interpret(addr, &parts, None, Duration::from_secs(120))
}

/// What one load phase saw.
#[derive(Debug, Default, serde::Serialize)]
struct Phase {
    clients: usize,
    seconds: f64,
    ok: usize,
    busy: usize,
    other: Vec<(u16, usize)>,
    io_errors: usize,
    throughput_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: Vec<f64>,
}

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn load(
    addr: SocketAddr,
    ups: &Arc<Vec<Upload>>,
    clients: usize,
    secs: f64,
    sample_rss: bool,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let ups = ups.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut got: Vec<(Option<u16>, f64)> = Vec::new();
                let mut k = c;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = send(addr, &ups[k % ups.len()]);
                    got.push((r.ok().map(|r| r.status), t.elapsed().as_secs_f64() * 1e3));
                    k += clients;
                }
                got
            })
        })
        .collect();
    let mut rss = Vec::new();
    let end = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(if sample_rss { 1000 } else { 50 })
                .min(end - Instant::now().min(end)),
        );
        if sample_rss {
            rss.push(rss_mib("VmRSS:"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut p = Phase {
        clients,
        ..Default::default()
    };
    let mut lat = Vec::new();
    let mut other = std::collections::BTreeMap::new();
    for t in threads {
        for (status, ms) in t.join().unwrap_or_default() {
            match status {
                Some(200) => {
                    p.ok += 1;
                    lat.push(ms);
                }
                Some(503) => p.busy += 1,
                Some(s) => *other.entry(s).or_insert(0) += 1,
                None => p.io_errors += 1,
            }
        }
    }
    p.seconds = t0.elapsed().as_secs_f64();
    p.other = other.into_iter().collect();
    lat.sort_by(f64::total_cmp);
    p.throughput_per_s = p.ok as f64 / p.seconds;
    p.p50_ms = quantile(&lat, 0.5);
    p.p99_ms = quantile(&lat, 0.99);
    p.rss_mib = rss;
    p
}

/// `bench serve`.
pub fn run(a: &ServeArgs, json: bool) -> Result<()> {
    if !(a.duration > 0.0 && a.soak >= 0.0) {
        bail!("--duration must be positive and --soak not negative");
    }
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let (ups, what) = uploads(a)?;
    let ups = Arc::new(ups);

    // (1) The reference: the engine itself on `workers` threads.
    let engine = Arc::new(
        evl_infer::bundle::Engine::load(&a.model)
            .with_context(|| format!("loading {}", a.model.display()))?,
    );
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (engine, ups, stop) = (engine.clone(), ups.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    let _ = engine.interpret(&ups[k % ups.len()].record);
                    n += 1;
                    k += workers;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(a.duration));
    stop.store(true, Ordering::Relaxed);
    let direct_n: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let direct = direct_n as f64 / t0.elapsed().as_secs_f64();
    drop(engine);

    // The service, in this process.
    let cfg = evl_serve::ServeConfig {
        workers,
        queue: a.queue,
        ..Default::default()
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let model = a.model.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let app = evl_serve::App::new(cfg);
            app.load_model(&model)?;
            addr_tx.send(listener.local_addr()?)?;
            evl_serve::serve(listener, app, async {
                let _ = stop_rx.await;
            })
            .await?;
            anyhow::Ok(())
        })
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(120))
        .context("the service did not start")?;
    // Warm-up.
    for u in ups.iter().take(2) {
        let _ = send(addr, u);
    }
    let below = load(addr, &ups, workers, a.duration, false);
    let over_clients = a.over.max(1) * (workers + a.queue);
    let above = load(addr, &ups, over_clients, a.duration, false);
    let soak = if a.soak > 0.0 {
        Some(load(addr, &ups, workers, a.soak, true))
    } else {
        None
    };
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the service thread panicked"))??;

    let ratio = below.throughput_per_s / direct;
    let below_ok = below.busy == 0 && below.other.is_empty() && below.io_errors == 0;
    let above_ok = above.other.is_empty() && above.io_errors == 0;
    let (rss_first, rss_last, rss_max) =
        soak.as_ref().map_or((f64::NAN, f64::NAN, f64::NAN), |s| {
            // The first samples include the allocator's warm-up; flatness is judged after them.
            let tail = &s.rss_mib[s.rss_mib.len().min(2)..];
            (
                tail.first().copied().unwrap_or(f64::NAN),
                tail.last().copied().unwrap_or(f64::NAN),
                tail.iter().copied().fold(f64::NAN, f64::max),
            )
        });
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "data": {
                "records": what, "workers": workers, "queue": a.queue,
                "direct_per_s": direct, "below": below, "above": above, "soak": soak,
                "service_vs_direct": ratio, "below_all_ok": below_ok, "above_only_503": above_ok,
                "rss_after_warmup_mib": [rss_first, rss_last, rss_max],
            }})
        );
    } else {
        let mut o = std::io::stdout().lock();
        use std::io::Write;
        let _ = writeln!(
            o,
            "bench serve: {} served by {} workers (queue {}), {what}, one connection per request",
            a.model.display(),
            workers,
            a.queue
        );
        let _ = writeln!(
            o,
            "| phase | clients | answered 200 | 503 | other | req/s | p50 ms | p99 ms |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            o,
            "| engine called directly (reference) | {workers} threads | {direct_n} | - | - | {direct:.1} | - | - |"
        );
        for (name, p) in [("below saturation", &below), ("above saturation", &above)]
            .into_iter()
            .chain(soak.as_ref().map(|s| ("soak", s)))
        {
            let other: usize = p.other.iter().map(|(_, n)| n).sum::<usize>() + p.io_errors;
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {other} | {:.1} | {:.1} | {:.1} |",
                p.clients, p.ok, p.busy, p.throughput_per_s, p.p50_ms, p.p99_ms
            );
        }
        let _ = writeln!(o, "service throughput / direct engine: {ratio:.3}");
        let _ = writeln!(
            o,
            "below saturation every request answered: {}; above saturation only 200 or 503: {}",
            if below_ok { "yes" } else { "NO" },
            if above_ok { "yes" } else { "NO" }
        );
        if soak.is_some() {
            let _ = writeln!(
                o,
                "resident memory over the soak (after 2 s): first {rss_first:.1} MiB, last {rss_last:.1} MiB, max {rss_max:.1} MiB"
            );
        }
    }
    if !below_ok || !above_ok {
        bail!("the service failed requests it should have answered (see the table)");
    }
    Ok(())
}
