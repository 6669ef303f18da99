//! Prometheus metrics of the service (`GET /metrics`, text exposition format): requests by
//! route and status, latency histograms by route, errors by kind, queue depth, running
//! inferences, worker panics, abandoned tasks and whether the model is loaded.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pool::PoolStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKind {
    kind: String,
}

type HistogramFamily = Family<Route, Histogram, fn() -> Histogram>;

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: HistogramFamily,
    errors: Family<ErrorKind, Counter>,
    queue_depth: Gauge,
    running: Gauge,
    workers: Gauge,
    panics: Gauge,
    abandoned: Gauge,
    ready: Gauge,
    pool: std::sync::OnceLock<Arc<PoolStats>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "evl_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "evl_request_duration_seconds",
            "Time from request to answer, by route",
            latency.clone(),
        );
        let errors = Family::<ErrorKind, Counter>::default();
        registry.register(
            "evl_errors",
            "Requests that ended in an error, by kind",
            errors.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "evl_queue_depth",
            "Inference tasks waiting for a worker",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "evl_inferences_running",
            "Inference tasks being run",
            running.clone(),
        );
        let workers = Gauge::default();
        registry.register(
            "evl_workers",
            "Live inference worker threads",
            workers.clone(),
        );
        let panics = Gauge::default();
        registry.register(
            "evl_worker_panics",
            "Worker panics caught since start (each worker was replaced)",
            panics.clone(),
        );
        let abandoned = Gauge::default();
        registry.register(
            "evl_tasks_abandoned",
            "Queued tasks skipped because their client had stopped waiting",
            abandoned.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "evl_model_ready",
            "1 once the model is loaded",
            ready.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            errors,
            queue_depth,
            running,
            workers,
            panics,
            abandoned,
            ready,
            pool: std::sync::OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Count one answered request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&Route {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// Count one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorKind {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The pool whose counters are reported.
    pub fn attach_pool(&self, stats: Arc<PoolStats>) {
        let _ = self.pool.set(stats);
    }

    /// Mark the model loaded (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(p) = self.pool.get() {
            self.queue_depth.set(p.queued.load(Ordering::SeqCst) as i64);
            self.running.set(p.running.load(Ordering::SeqCst) as i64);
            self.workers.set(p.workers.load(Ordering::SeqCst) as i64);
            self.panics.set(p.panics.load(Ordering::Relaxed) as i64);
            self.abandoned
                .set(p.abandoned.load(Ordering::Relaxed) as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
