//! `serve`: the HTTP service of `evl-serve` on a tokio runtime.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::args::ServeArgs;

/// `serve`.
pub fn run(a: &ServeArgs, json: bool) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let secs = |v: f64, name: &str| -> Result<Duration> {
        anyhow::ensure!(
            v.is_finite() && v > 0.0,
            "--{name} must be a positive number of seconds, not {v}"
        );
        Ok(Duration::from_secs_f64(v))
    };
    let mut cfg = evl_serve::ServeConfig {
        limits: evl_serve::Limits {
            max_body: a.max_body_mib.max(1) << 20,
            max_duration_s: a.max_duration,
            max_leads: a.max_leads,
            ..Default::default()
        },
        queue: a.queue,
        timeout: secs(a.timeout, "timeout")?,
        body_timeout: secs(a.body_timeout, "body-timeout")?,
        max_connections: a.max_connections,
        ..Default::default()
    };
    if let Some(w) = a.workers {
        cfg.workers = w.max(1);
    }
    anyhow::ensure!(
        a.model.join("config.json").is_file(),
        "{}: not a model directory (no config.json); `train`, `distill` and `quickstart` write \
         them (e.g. quickstart-out/model; the shipped teacher is zoo/teacher/model)",
        a.model.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("evl-serve-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .with_context(|| format!("listening on {}", a.addr))?;
        let app = evl_serve::App::new(cfg);
        // Listen first (so /healthz answers and /readyz says "loading"), then load.
        let loader = app.clone();
        let dir = a.model.clone();
        let info = tokio::task::spawn_blocking(move || loader.load_model(&dir))
            .await
            .context("loading the model")?
            .with_context(|| format!("loading model {}", a.model.display()))?;
        let addr = listener.local_addr().unwrap_or(a.addr);
        if json {
            out!(
                "{}",
                serde_json::json!({"type": "listening", "data": {"addr": addr.to_string(), "model": info}})
            );
        } else {
            progress!(
                "serving {} (version {}, reads {}) on http://{addr}/  (Ctrl-C to stop)",
                info.id,
                info.version,
                info.input
            );
        }
        evl_serve::serve(listener, app, shutdown_signal()).await?;
        progress!("stopped");
        anyhow::Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix (what a container runtime sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
