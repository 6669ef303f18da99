//! The HTTP routes and the work behind `POST /v1/interpret`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use evl_infer::served::ServedModel;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{Full, Outcome, Pool};
use crate::upload::{Input, Limits, parse_multipart, read_upload};

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Limits on each request's body and record.
    pub limits: Limits,
    /// Inference worker threads.
    pub workers: usize,
    /// Requests that may wait for a worker; one more is answered 503.
    pub queue: usize,
    /// Longest wait for an answer once the upload has arrived (queue + inference).
    pub timeout: Duration,
    /// Longest time to receive a request body.
    pub body_timeout: Duration,
    /// Longest time to receive a request's headers.
    pub header_timeout: Duration,
    /// Most open connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Longest wait for accepted requests at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            limits: Limits::default(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue: 64,
            timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What the service says about its model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The model directory's name.
    pub id: String,
    /// First 16 hex digits of the sha256 of the weight files (`model.safetensors`, or a
    /// checkpoint's shards in name order): changes with any weight.
    pub version: String,
    /// `evl-ecg` for a toolkit bundle, or the checkpoint's family (`qwen3_vl`,
    /// `llava_next`).
    pub architecture: String,
    /// What it reads (`image` or `signal`).
    pub input: String,
    /// The labels its probabilities are over.
    pub labels: Vec<String>,
    /// Its weights: `f32`, the int8 scheme of a bundle `evl-ecg model quantize` wrote, or a
    /// checkpoint's storage dtype (run in f32).
    pub precision: String,
    /// Version of evl-ecg serving it.
    pub toolkit: String,
}

struct Loaded {
    model: ServedModel,
    info: ModelInfo,
}

/// One upload waiting for a worker.
pub struct Job {
    content_type: String,
    body: bytes::Bytes,
    queued_at: Instant,
}

type JobResult = Result<Value, ApiError>;

/// Shared state of the routes.
pub struct AppState {
    cfg: ServeConfig,
    model: Arc<OnceLock<Loaded>>,
    pool: Pool<Job, JobResult>,
    metrics: Metrics,
    stopping: AtomicBool,
    next_id: AtomicU64,
    nonce: u64,
}

/// The service: state and routes. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub(crate) state: Arc<AppState>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// A service without a model yet (`/readyz` answers 503 until [`App::load_model`]).
    pub fn new(cfg: ServeConfig) -> App {
        let model: Arc<OnceLock<Loaded>> = Arc::new(OnceLock::new());
        let for_workers = model.clone();
        let limits = cfg.limits.clone();
        let pool = Pool::new(cfg.workers, cfg.queue, move |id: &str, job: Job| {
            let started = Instant::now();
            let m = for_workers
                .get()
                .ok_or_else(|| ApiError::not_ready("the model is still loading"))?;
            let mut v = run_job(m, &limits, id, &job)?;
            v["timings_ms"]["queue"] = json!(ms(started - job.queued_at));
            Ok(v)
        });
        let metrics = Metrics::default();
        metrics.attach_pool(pool.stats().clone());
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        App {
            state: Arc::new(AppState {
                cfg,
                model,
                pool,
                metrics,
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                nonce,
            }),
        }
    }

    /// Load a model directory (as `train`/`distill`/`model quantize` write them, or a
    /// Hugging Face / LLaVA checkpoint of Qwen3-VL or LLaVA-NeXT) and mark the service ready.
    pub fn load_model(&self, dir: &std::path::Path) -> evl_infer::Result<ModelInfo> {
        let model = ServedModel::load(dir)?;
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        for path in ServedModel::weight_files(dir)? {
            let io = |source| evl_infer::Error::Io {
                path: path.clone(),
                source,
            };
            let mut f = std::fs::File::open(&path).map_err(io)?;
            std::io::copy(&mut f, &mut hasher).map_err(io)?;
        }
        let digest = format!("{:x}", hasher.finalize());
        let info = ModelInfo {
            id: model_id(dir),
            version: digest[..16].to_string(),
            architecture: model.architecture().into(),
            input: model.input().into(),
            labels: model.labels().to_vec(),
            precision: model.precision(),
            toolkit: env!("CARGO_PKG_VERSION").into(),
        };
        let _ = self.state.model.set(Loaded {
            model,
            info: info.clone(),
        });
        self.state.metrics.set_ready(true);
        Ok(info)
    }

    /// Whether a model is loaded and the service is not stopping.
    pub fn ready(&self) -> bool {
        self.state.model.get().is_some() && !self.state.stopping.load(Ordering::SeqCst)
    }

    /// Mark the service as stopping (`/readyz` answers 503).
    pub fn set_stopping(&self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.state.metrics.set_ready(false);
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.state.cfg
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/v1/model", get(model_info))
            .route("/v1/example.csv", get(example_csv))
            .route("/v1/interpret", post(interpret))
            .fallback(not_found)
            .with_state(self.state.clone())
    }
}

/// The model directory's name, with its parent's when the directory is just `model` (as
/// runs write them: `teacher/model` says more than `model`).
fn model_id(dir: &std::path::Path) -> String {
    let full = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(&full) {
        Some(n) if n == "model" => match full.parent().and_then(name) {
            Some(parent) => format!("{parent}/{n}"),
            None => n,
        },
        Some(n) => n,
        None => "model".into(),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Read the upload, run the model, build the answer (on a worker thread).
fn run_job(m: &Loaded, limits: &Limits, id: &str, job: &Job) -> JobResult {
    let t = Instant::now();
    let up = parse_multipart(&job.content_type, &job.body, limits)?;
    let input = read_upload(&up, limits)?;
    let read_ms = ms(t.elapsed());
    let t = Instant::now();
    let (sample, record_json, record) = match input {
        Input::Record(r, kind) => {
            let sample = m
                .model
                .prepare(&r)
                .map_err(|e| ApiError::bad_record(format!("{}: {}", r.name, chain(&e))))?;
            let leads: Vec<&str> = r.channels.iter().map(|c| c.description.as_str()).collect();
            let meta = json!({
                "name": r.name,
                "kind": kind,
                "fs": r.fs,
                "leads": leads,
                "n_samples": r.n_samples,
                "duration_s": r.duration_s(),
            });
            (sample, meta, Some(r))
        }
        Input::Image(f) => {
            let sample = m
                .model
                .prepare_image(&f.name, &f.bytes)
                .map_err(|e| match e {
                    evl_infer::Error::Config { what, .. } if what.contains("reads signals") => {
                        ApiError::unsupported(what)
                    }
                    other => ApiError::bad_record(chain(&other)),
                })?;
            (sample, json!({"name": f.name, "kind": "image"}), None)
        }
    };
    let reading = m
        .model
        .read(&sample, up.question.as_deref())
        .map_err(|e| ApiError::internal(format!("the model failed: {}", chain(&e))))?;
    let model_ms = ms(t.elapsed());
    let t = Instant::now();
    let image = match (&record, up.render) {
        (Some(r), true) => Some(render_png(r)?),
        _ => None,
    };
    let render_ms = ms(t.elapsed());
    let probabilities: Vec<Value> = reading
        .probabilities
        .iter()
        .map(|(l, p)| json!({"label": l, "p": p}))
        .collect();
    let mut v = json!({
        "request_id": id,
        "model": m.info,
        "record": record_json,
        "probabilities": probabilities,
        "answer": reading.answer,
        "question": reading.question,
        "timings_ms": {"read": read_ms, "model": model_ms, "render": render_ms},
    });
    if let Some(png) = image {
        v["image_png"] = json!(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok(v)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The record as 12-lead ECG paper (3x4 + rhythm strip, 100 dpi) in PNG.
fn render_png(r: &ecg_io::Record) -> Result<Vec<u8>, ApiError> {
    let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: 100.0,
        ..Default::default()
    })
    .map_err(|e| ApiError::internal(format!("renderer: {e}")))?;
    let img = renderer
        .render(r)
        .map_err(|e| ApiError::bad_record(format!("{}: cannot render: {e}", r.name)))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal(format!("PNG encoding: {e}")))?;
    Ok(out.into_inner())
}

fn request_id(headers: &HeaderMap, s: &AppState) -> String {
    // A client's own id is kept when it is short and plain (so it can be logged safely).
    if let Some(v) = headers.get("x-request-id").and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return v.to_string();
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-{n:08}", (s.nonce >> 16) as u32)
}

fn with_id(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

fn error_response(e: &ApiError, id: &str) -> Response {
    let body = json!({"error": {"kind": e.kind, "message": e.message, "request_id": id}});
    let mut r = (e.status_code(), axum::Json(body)).into_response();
    if e.status == 503 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    with_id(r, id)
}

async fn interpret(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let id = request_id(&headers, &s);
    let result = interpret_inner(&s, &id, &headers, body).await;
    let resp = match result {
        Ok(mut v) => {
            v["timings_ms"]["total"] = json!(ms(t0.elapsed()));
            with_id(axum::Json(v).into_response(), &id)
        }
        Err(e) => {
            s.metrics.error(e.kind);
            if e.status >= 500 {
                tracing::warn!(request_id = %id, kind = e.kind, "{}", e.message);
            }
            error_response(&e, &id)
        }
    };
    s.metrics.observe(
        "/v1/interpret",
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

async fn interpret_inner(s: &AppState, id: &str, headers: &HeaderMap, body: Body) -> JobResult {
    if s.stopping.load(Ordering::SeqCst) {
        return Err(ApiError::not_ready("the service is stopping"));
    }
    if s.model.get().is_none() {
        return Err(ApiError::not_ready("the model is still loading"));
    }
    let max = s.cfg.limits.max_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::too_large(format!(
            "the body is {} bytes; the limit is {max}",
            declared.unwrap_or(0)
        )));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Err(ApiError::unsupported(format!(
            "expected a multipart/form-data upload, got Content-Type `{content_type}`"
        )));
    }
    let limited = http_body_util::Limited::new(body, max);
    let body = match tokio::time::timeout(s.cfg.body_timeout, limited.collect()).await {
        Err(_) => {
            return Err(ApiError::slow_upload(format!(
                "the body did not arrive within {} s",
                s.cfg.body_timeout.as_secs_f64()
            )));
        }
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(ApiError::too_large(format!(
                    "the body is over the limit of {max} bytes"
                )));
            }
            return Err(ApiError::bad_upload(format!("the upload broke off: {e}")));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let job = Job {
        content_type,
        body,
        queued_at: Instant::now(),
    };
    let rx = s.pool.submit(id, job).map_err(|Full| {
        ApiError::busy(format!(
            "all {} workers are busy and {} requests are waiting; retry shortly",
            s.cfg.workers, s.cfg.queue
        ))
    })?;
    match tokio::time::timeout(s.cfg.timeout, rx).await {
        Err(_) => Err(ApiError::timeout(format!(
            "no answer within {} s",
            s.cfg.timeout.as_secs_f64()
        ))),
        Ok(Err(_)) => Err(ApiError::internal("the worker dropped the request")),
        Ok(Ok(Outcome::Panicked(_))) => Err(ApiError::internal(format!(
            "the worker handling request {id} failed (logged); it has been replaced"
        ))),
        Ok(Ok(Outcome::Done(r))) => r,
    }
}

async fn page(State(s): State<Arc<AppState>>) -> Response {
    let t = Instant::now();
    let r = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        crate::page::INDEX_HTML,
    )
        .into_response();
    s.metrics.observe("/", 200, t.elapsed().as_secs_f64());
    r
}

async fn healthz(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.observe("/healthz", 200, 0.0);
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let ready = s.model.get().is_some() && !s.stopping.load(Ordering::SeqCst);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    s.metrics.observe("/readyz", status.as_u16(), 0.0);
    let why = if s.stopping.load(Ordering::SeqCst) {
        "stopping"
    } else if ready {
        "ready"
    } else {
        "loading the model"
    };
    (status, axum::Json(json!({"ready": ready, "status": why}))).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.observe("/metrics", 200, 0.0);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn model_info(State(s): State<Arc<AppState>>) -> Response {
    match s.model.get() {
        Some(m) => axum::Json(json!(m.info)).into_response(),
        None => error_response(&ApiError::not_ready("the model is still loading"), "-"),
    }
}

#[derive(serde::Deserialize)]
struct ExampleQuery {
    seed: Option<u64>,
}

/// A SYNTHETIC 10 s 12-lead record at 500 Hz in the CSV layout, for trying the page.
async fn example_csv(Query(q): Query<ExampleQuery>) -> Response {
    let cfg = ecg_synth::SynthConfig {
        fs: 500,
        ..Default::default()
    };
    let seed = q.seed.unwrap_or(1);
    let e = ecg_synth::generate(&cfg, seed, 0);
    let mut out = Vec::new();
    if let Err(err) = ecg_io::csv::write_csv(&e.record, false, &mut out) {
        return error_response(&ApiError::internal(err.to_string()), "-");
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"synthetic-{seed}.csv\""),
            ),
            (
                header::HeaderName::from_static("x-synthetic-truth"),
                e.truth.superclasses.join(","),
            ),
        ],
        out,
    )
        .into_response()
}

async fn not_found() -> Response {
    error_response(&ApiError::new_not_found(), "-")
}
