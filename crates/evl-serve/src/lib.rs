//! evl-ecg as a service: `evl-ecg serve --model DIR` answers `POST /v1/interpret` with the
//! model's findings for an uploaded ECG (WFDB, CinC `.hea` + `.mat`, EDF, CSV or an image of
//! ECG paper), serves an offline web page at `/`, and reports `/healthz`, `/readyz` and
//! Prometheus `/metrics`.
//!
//! How a request flows: hyper (HTTP/1.1, header read timeout, bounded connections) ->
//! axum routes ([`api`]) -> the body is received under a size limit and a time limit ->
//! a bounded queue ([`pool`]; full means 503 with `Retry-After`) -> a worker thread parses
//! the multipart body and reads the record ([`upload`]) in a private temporary directory, runs
//! the model on the CPU (a toolkit bundle on the native engine, a Hugging Face checkpoint of
//! Qwen3-VL or LLaVA-NeXT on burn's CPU backend: [`evl_infer::served`]) and answers with the
//! request id. Slow uploads therefore never hold a
//! worker, and nothing a client sends outlives its request on disk.

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod client;
pub mod error;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod page;
#[cfg(feature = "server")]
pub mod pool;
pub mod upload;

#[cfg(feature = "server")]
pub use api::{App, ModelInfo, ServeConfig};
pub use error::ApiError;
pub use upload::Limits;

/// Serve `app` on `listener` until `shutdown` completes; then stop accepting, let accepted
/// requests finish (up to the configured grace period) and return.
#[cfg(feature = "server")]
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::sync::Arc;
    let cfg = app.config().clone();
    let router = app.router();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        // A connection slot first: past the limit, new connections wait in the backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    app.set_stopping();
    tracing::info!("stopping: finishing accepted requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(cfg.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
    Ok(())
}
