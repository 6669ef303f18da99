//! The service end to end on loopback, with the teacher the repository ships
//! (`zoo/teacher/model`, an image model: every record is rendered as ECG paper, as PULSE
//! reads them): answers match the same record run alone under concurrency, limits and bad
//! input end in 4xx/503 JSON errors naming the problem while the server keeps answering,
//! and shutdown finishes accepted requests.
//!
//! The tests share one lock: each starts its own server, and they must not compete for the
//! two cores (or for the temporary directory the leak check counts).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use evl_serve::client::{self, BOUNDARY, Part, Response as Resp};
use evl_serve::{App, Limits, ServeConfig};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn zoo_model() -> PathBuf {
    evl_testkit::workspace_root().join("zoo/teacher/model")
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(cfg: ServeConfig) -> Server {
        Server::start_with(cfg, zoo_model())
    }

    fn start_with(cfg: ServeConfig, model: PathBuf) -> Server {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let app = App::new(cfg);
                app.load_model(&model).unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                evl_serve::serve(listener, app, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Assertions on the client's responses.
trait RespExt {
    fn json(&self) -> Value;
    fn expect_error(&self, status: u16, needle: &str);
}

impl RespExt for Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// An error answer: its status is `status` and its message contains `needle`.
    fn expect_error(&self, status: u16, needle: &str) {
        let j = self.json();
        assert_eq!(self.status, status, "{j}");
        let msg = j["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "expected `{needle}` in: {j}");
        assert!(j["error"]["kind"].is_string(), "{j}");
    }
}

const WAIT: Duration = Duration::from_secs(120);

fn parse_response(raw: &[u8]) -> Resp {
    client::parse_response(raw).unwrap()
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    client::request(addr, method, path, extra, body, WAIT).unwrap()
}

fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    client::multipart(parts)
}

fn interpret(addr: SocketAddr, parts: &[Part<'_>], id: Option<&str>) -> Resp {
    client::interpret(addr, parts, id, WAIT).unwrap()
}

/// A SYNTHETIC 12-lead record as CSV (500 Hz, 10 s).
fn synthetic_csv(seed: u64) -> Vec<u8> {
    let cfg = ecg_synth::SynthConfig {
        fs: 500,
        difficulty: ecg_synth::Difficulty::Mixed,
        ..Default::default()
    };
    let e = ecg_synth::generate(&cfg, seed, 0);
    let mut out = Vec::new();
    ecg_io::csv::write_csv(&e.record, false, &mut out).unwrap();
    out
}

fn temp_leftovers() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("evl-serve-"))
        .count()
}

fn small_config() -> ServeConfig {
    ServeConfig {
        workers: 2,
        queue: 32,
        ..Default::default()
    }
}

/// Different records sent at once by many clients: every answer carries the request id it
/// answers and equals the answer for the same record sent alone; nothing is left on disk.
#[test]
fn concurrent_answers_match_each_record_alone() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = temp_leftovers();
    let server = Server::start(small_config());
    let csvs: Vec<Vec<u8>> = (0..6).map(|s| synthetic_csv(9_000 + s)).collect();
    let alone: Vec<Value> = csvs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("rec{i}.csv");
            let r = interpret(
                server.addr,
                &[Part::File(&name, c), Part::Field("fs", "500")],
                None,
            );
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            r.json()
        })
        .collect();
    // The records must differ in what the model says, or the check below proves nothing.
    let distinct: std::collections::BTreeSet<String> = alone
        .iter()
        .map(|j| j["probabilities"].to_string())
        .collect();
    assert!(
        distinct.len() >= 5,
        "the model gives the same output for different records"
    );

    let threads: Vec<_> = (0..8)
        .map(|t| {
            let csvs = csvs.clone();
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for k in 0..3 {
                    let i = (t * 5 + k * 7) % csvs.len();
                    let id = format!("client{t}-req{k}-rec{i}");
                    let name = format!("rec{i}.csv");
                    let r = interpret(
                        addr,
                        &[Part::File(&name, &csvs[i]), Part::Field("fs", "500")],
                        Some(&id),
                    );
                    got.push((id, i, r));
                }
                got
            })
        })
        .collect();
    let mut n = 0;
    for t in threads {
        for (id, i, r) in t.join().unwrap() {
            assert_eq!(r.status, 200, "{id}: {}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.header("x-request-id"), Some(id.as_str()));
            let j = r.json();
            assert_eq!(j["request_id"], id.as_str());
            assert_eq!(j["record"]["name"], format!("rec{i}"));
            assert_eq!(j["probabilities"], alone[i]["probabilities"], "{id}");
            assert_eq!(j["answer"], alone[i]["answer"], "{id}");
            n += 1;
        }
    }
    assert_eq!(n, 24);
    assert_eq!(
        temp_leftovers(),
        before,
        "uploads left in the temporary directory"
    );
}

/// Every kind of upload the service reads gives an answer with the record's metadata.
#[test]
fn every_supported_kind_is_read() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    // The EDF sample is 600 s long, over the default limit of 300 s.
    let server = Server::start(ServeConfig {
        limits: Limits {
            max_duration_s: 3600.0,
            ..Default::default()
        },
        ..small_config()
    });
    let d = shared.join("data");
    let read = |p: &str| std::fs::read(d.join(p)).unwrap();
    let (hea, dat) = (
        read("ptbxl_subset/records500/00000/00001_hr.hea"),
        read("ptbxl_subset/records500/00000/00001_hr.dat"),
    );
    let r = interpret(
        server.addr,
        &[
            Part::File("00001_hr.hea", &hea),
            Part::File("00001_hr.dat", &dat),
            Part::Field("render", "true"),
        ],
        None,
    );
    let j = r.json();
    assert_eq!(r.status, 200, "{j}");
    assert_eq!(j["record"]["kind"], "wfdb");
    assert_eq!(j["record"]["fs"], 500.0);
    assert_eq!(j["record"]["n_samples"], 5000);
    assert_eq!(j["record"]["leads"].as_array().unwrap().len(), 12);
    assert_eq!(j["probabilities"].as_array().unwrap().len(), 5);
    assert!(
        j["model"]["version"].as_str().unwrap().len() == 16,
        "{}",
        j["model"]
    );
    // The rendered page is a PNG.
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(j["image_png"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    let (hea, mat) = (
        read("cinc2021_subset/cpsc2018/A0001.hea"),
        read("cinc2021_subset/cpsc2018/A0001.mat"),
    );
    let r = interpret(
        server.addr,
        &[Part::File("A0001.hea", &hea), Part::File("A0001.mat", &mat)],
        None,
    );
    let j = r.json();
    assert_eq!(r.status, 200, "{j}");
    assert_eq!(j["record"]["kind"], "cinc");
    assert!(j.get("image_png").is_none(), "rendered without being asked");

    // wfdb-python's EDF sample holds test signals (square wave, ramp, ...), no ECG lead: it
    // reads, and the model's input cannot be made from it, which the answer says.
    let edf = read("wfdb_python_sample/test_generator_2.edf");
    let r = interpret(
        server.addr,
        &[Part::File("test_generator_2.edf", &edf)],
        None,
    );
    r.expect_error(422, "none of the 12 standard leads");
    // The same signals renamed as ECG leads (an EDF header's labels are 16-byte fields at
    // offset 256) read as an EDF record and are answered.
    let mut ecg = edf.clone();
    let n_sig: usize = std::str::from_utf8(&ecg[252..256])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leads = [
        "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
    ];
    for (k, lead) in leads.iter().enumerate().take(n_sig) {
        if ecg[256 + 16 * k..].starts_with(b"EDF Annotations") {
            continue;
        }
        let field = format!("{lead:<16}");
        ecg[256 + 16 * k..256 + 16 * (k + 1)].copy_from_slice(field.as_bytes());
    }
    let r = interpret(server.addr, &[Part::File("renamed.edf", &ecg)], None);
    let j = r.json();
    assert_eq!(r.status, 200, "{j}");
    assert_eq!(j["record"]["kind"], "edf");
    assert_eq!(j["record"]["fs"], 200.0);

    let png = read("ptbxl_subset/records100/00000/00001_lr-0.png");
    let r = interpret(
        server.addr,
        &[
            Part::File("00001_lr-0.png", &png),
            Part::Field("question", "Does this ECG show a normal rhythm?"),
        ],
        None,
    );
    let j = r.json();
    assert_eq!(r.status, 200, "{j}");
    assert_eq!(j["record"]["kind"], "image");
    assert_eq!(j["question"], "Does this ECG show a normal rhythm?");
}

/// Broken uploads of every kind: a 4xx whose message names the problem; the server keeps
/// answering.
#[test]
fn malformed_uploads_are_named_and_the_server_stays_up() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(ServeConfig {
        limits: Limits {
            max_body: 1 << 20,
            max_duration_s: 60.0,
            ..Default::default()
        },
        ..small_config()
    });
    let a = server.addr;
    let dat = vec![0u8; 40];
    let cases: Vec<(Vec<Part<'_>>, u16, &str)> = vec![
        // WFDB: a header that does not parse, a signal file that is short, a file not sent,
        // a file outside the upload.
        (
            vec![
                Part::File("r.hea", b"r two 500 10\n"),
                Part::File("r.dat", &dat),
            ],
            422,
            "number of signals",
        ),
        (
            vec![
                Part::File(
                    "r.hea",
                    b"r 2 100 20\nr.dat 16 200 16 0 0 0 0 I\nr.dat 16 200 16 0 0 0 0 II\n",
                ),
                Part::File("r.dat", &dat),
            ],
            422,
            "r.dat",
        ),
        (
            vec![Part::File(
                "r.hea",
                b"r 1 100 10\nr.dat 16 200 16 0 0 0 0 I\n",
            )],
            400,
            "`r.dat`, which is not in the upload",
        ),
        (
            vec![Part::File(
                "r.hea",
                b"r 1 100 10\n../../../../etc/passwd 16 200 16 0 0 0 0 I\n",
            )],
            422,
            "signal file name",
        ),
        (
            vec![Part::File("../../evil.hea", b"r 1 100 10\n")],
            400,
            "not a plain file name",
        ),
        // Limits from the header alone.
        (
            vec![
                Part::File("r.hea", b"r 1 100 100000\nr.dat 16 200 16 0 0 0 0 I\n"),
                Part::File("r.dat", &dat),
            ],
            413,
            "the limit is 60 s",
        ),
        // CinC .mat that is not MATLAB v4.
        (
            vec![
                Part::File(
                    "A1.hea",
                    b"A1 1 500 10\nA1.mat 16+24 1000/mV 16 0 0 0 0 I\n",
                ),
                Part::File("A1.mat", b"not a matlab file at all, just text"),
            ],
            422,
            "A1.mat",
        ),
        // CSV: a bad cell, no rate.
        (
            vec![
                Part::File("x.csv", b"I,II\n0.1,zz\n"),
                Part::Field("fs", "500"),
            ],
            422,
            "column `II`",
        ),
        (vec![Part::File("x.csv", b"I,II\n0.1,0.2\n")], 400, "`fs`"),
        // EDF and images that are not.
        (vec![Part::File("x.edf", b"0       garbage")], 422, "x.edf"),
        (
            vec![Part::File("x.png", b"\x89PNG\r\n\x1a\nbroken")],
            422,
            "x.png",
        ),
        (
            vec![Part::File("x.png", b"GIF89a")],
            422,
            "not a PNG or JPEG",
        ),
        (vec![Part::File("notes.txt", b"hello")], 415, "`.txt`"),
        (vec![Part::Field("fs", "500")], 400, "no file"),
        (
            vec![Part::File("x.csv", b"I\n1\n"), Part::Field("colour", "red")],
            400,
            "unknown field",
        ),
    ];
    for (parts, status, needle) in &cases {
        let r = interpret(a, parts, None);
        r.expect_error(*status, needle);
    }
    // Not multipart; a multipart body cut short; no boundary.
    let r = request(
        a,
        "POST",
        "/v1/interpret",
        &[("Content-Type", "application/json")],
        b"{}",
    );
    r.expect_error(415, "multipart/form-data");
    let body = multipart(&[Part::File("x.csv", b"I\n1\n")]);
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let r = request(
        a,
        "POST",
        "/v1/interpret",
        &[("Content-Type", &ct)],
        &body[..body.len() / 2],
    );
    r.expect_error(400, "multipart");
    let r = request(
        a,
        "POST",
        "/v1/interpret",
        &[("Content-Type", "multipart/form-data")],
        b"x",
    );
    r.expect_error(400, "boundary");
    // Unknown route.
    let r = request(a, "GET", "/etc/passwd", &[], b"");
    r.expect_error(404, "no such route");
    // Still up, still right.
    let r = interpret(
        a,
        &[
            Part::File("ok.csv", &synthetic_csv(1)),
            Part::Field("fs", "500"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.json());
}

/// Oversized bodies, slow clients and clients that vanish mid-upload: each is cut off with a
/// JSON error (or a closed connection), and others are still served meanwhile.
#[test]
fn oversized_slow_and_vanishing_clients() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(ServeConfig {
        limits: Limits {
            max_body: 512 << 10,
            ..Default::default()
        },
        body_timeout: Duration::from_millis(1500),
        header_timeout: Duration::from_millis(1500),
        ..small_config()
    });
    let a = server.addr;
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    // Declared too large: refused before reading.
    let big = multipart(&[Part::File("big.csv", &vec![b'1'; 600 << 10])]);
    let r = request(a, "POST", "/v1/interpret", &[("Content-Type", &ct)], &big);
    r.expect_error(413, "limit");
    // Too large without a declared length (chunked): cut off at the limit.
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v1/interpret HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: {ct}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for _ in 0..80 {
        let chunk = vec![b'x'; 8192];
        if write!(s, "{:x}\r\n", chunk.len()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw).expect_error(413, "over the limit");

    // A body a byte at a time, slower than the body timeout allows: 408.
    let slow = std::thread::spawn(move || {
        let body = multipart(&[Part::File("x.csv", b"I\n1\n"), Part::Field("fs", "500")]);
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST /v1/interpret HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let t = Instant::now();
        for b in body.iter().take(6) {
            if s.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        (parse_response(&raw), t.elapsed())
    });
    // Headers a byte at a time: the connection is closed at the header timeout.
    let slow_headers = std::thread::spawn(move || {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let t = Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: yes\r\n".iter() {
            if s.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if t.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        (raw, t.elapsed())
    });
    // A client that promises 50 kB, sends 1 kB and hangs up.
    for _ in 0..5 {
        let mut s = TcpStream::connect(a).unwrap();
        write!(
            s,
            "POST /v1/interpret HTTP/1.1\r\nHost: t\r\nContent-Type: {ct}\r\nContent-Length: 50000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&[b'-'; 1000]).unwrap();
        drop(s);
    }
    // Meanwhile an ordinary client is served.
    let r = interpret(
        a,
        &[
            Part::File("ok.csv", &synthetic_csv(2)),
            Part::Field("fs", "500"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.json());

    let (r, took) = slow.join().unwrap();
    r.expect_error(408, "did not arrive");
    assert!(
        took < Duration::from_secs(10),
        "slow body held for {took:?}"
    );
    let (raw, took) = slow_headers.join().unwrap();
    assert!(
        took < Duration::from_secs(8),
        "a client sending headers a byte at a time held its connection for {took:?}"
    );
    assert!(
        raw.is_empty() || raw.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let r = request(a, "GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
}

/// A full queue is answered 503 with Retry-After at once; nothing else fails; the metrics
/// count what happened.
#[test]
fn a_full_queue_answers_503_and_metrics_count_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(ServeConfig {
        workers: 1,
        queue: 1,
        ..Default::default()
    });
    let a = server.addr;
    let csv = synthetic_csv(3);
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let csv = csv.clone();
            std::thread::spawn(move || {
                interpret(
                    a,
                    &[Part::File("q.csv", &csv), Part::Field("fs", "500")],
                    None,
                )
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for t in threads {
        let r = t.join().unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"]["kind"], "busy");
                busy += 1;
            }
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
    let m = request(a, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains(&format!(
            "evl_requests_total{{route=\"/v1/interpret\",status=\"200\"}} {ok}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("evl_errors_total{{kind=\"busy\"}} {busy}")),
        "{text}"
    );
    assert!(text.contains("evl_queue_depth 0"), "{text}");
    assert!(text.contains("evl_model_ready 1"), "{text}");
    assert!(text.contains("evl_workers 1"), "{text}");
    let r = request(a, "GET", "/readyz", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
}

/// Shutdown while requests are in flight: each accepted request is answered; afterwards the
/// port refuses connections. The page and the example it uses are served.
#[test]
fn shutdown_finishes_accepted_requests_and_the_page_is_offline() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut server = Server::start(ServeConfig {
        workers: 1,
        queue: 8,
        ..Default::default()
    });
    let a = server.addr;
    let page = request(a, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("/v1/interpret") && html.contains("<script>"));
    for external in ["http://", "https://", "//cdn", "src=\"//"] {
        assert!(!html.contains(external), "the page refers to `{external}`");
    }
    let ex = request(a, "GET", "/v1/example.csv?seed=4", &[], b"");
    assert_eq!(ex.status, 200);
    assert!(ex.header("x-synthetic-truth").is_some());
    assert_eq!(ex.body, synthetic_csv_plain(4));

    let csv = synthetic_csv(5);
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let csv = csv.clone();
            std::thread::spawn(move || {
                interpret(
                    a,
                    &[Part::File("s.csv", &csv), Part::Field("fs", "500")],
                    Some(&format!("flight{i}")),
                )
            })
        })
        .collect();
    // Let the requests arrive, then stop.
    std::thread::sleep(Duration::from_millis(150));
    server.stop();
    for t in in_flight {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert!(
        TcpStream::connect(a).is_err(),
        "still accepting after shutdown"
    );
}

/// `GET /v1/example.csv` is the generator's default 500 Hz record (not the mixed difficulty).
fn synthetic_csv_plain(seed: u64) -> Vec<u8> {
    let cfg = ecg_synth::SynthConfig {
        fs: 500,
        ..Default::default()
    };
    let e = ecg_synth::generate(&cfg, seed, 0);
    let mut out = Vec::new();
    ecg_io::csv::write_csv(&e.record, false, &mut out).unwrap();
    out
}

/// The paper's architectures are served like a bundle: a Hugging Face checkpoint of each
/// family (the tiny Qwen3-VL and LLaVA-NeXT of `../shared/hf`) loads, says what it is, reads
/// a WFDB record (rendered as ECG paper) and a PNG, and each answer under concurrency equals
/// the same record's answer alone.
#[test]
fn hugging_face_checkpoints_are_served() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let d = shared.join("data");
    let read = |p: &str| std::fs::read(d.join(p)).unwrap();
    let records = [
        ("00001_hr", "ptbxl_subset/records500/00000/00001_hr"),
        ("00002_hr", "ptbxl_subset/records500/00000/00002_hr"),
        ("00003_hr", "ptbxl_subset/records500/00000/00003_hr"),
    ];
    let files: Vec<(String, Vec<u8>, String, Vec<u8>)> = records
        .iter()
        .map(|(n, p)| {
            (
                format!("{n}.hea"),
                read(&format!("{p}.hea")),
                format!("{n}.dat"),
                read(&format!("{p}.dat")),
            )
        })
        .collect();
    let mut versions = Vec::new();
    for (family, dir) in [
        ("qwen3_vl", "qwen3_vl_tiny"),
        ("llava_next", "llava_next_tiny"),
    ] {
        let model = shared.join("hf").join(dir);
        // A checkpoint reads a whole rendered page per record (LLaVA-NeXT: several anyres
        // tiles), seconds on the CPU: a longer answer time than the bundle tests need.
        let cfg = ServeConfig {
            timeout: Duration::from_secs(600),
            ..small_config()
        };
        let server = Server::start_with(cfg, model.clone());
        let info = request(server.addr, "GET", "/v1/model", &[], b"").json();
        assert_eq!(info["architecture"], family, "{info}");
        assert_eq!(info["input"], "image", "{info}");
        assert_eq!(info["labels"].as_array().unwrap().len(), 5, "{info}");
        // The version is the weights' digest.
        use sha2::Digest;
        let digest = format!(
            "{:x}",
            sha2::Sha256::digest(std::fs::read(model.join("model.safetensors")).unwrap())
        );
        assert_eq!(info["version"], &digest[..16], "{info}");
        versions.push(digest);

        let send = |i: usize, id: Option<&str>| {
            let (h, hb, s, sb) = &files[i];
            interpret(
                server.addr,
                &[
                    Part::File(h, hb),
                    Part::File(s, sb),
                    Part::Field("render", "true"),
                ],
                id,
            )
        };
        let alone: Vec<Value> = (0..files.len())
            .map(|i| {
                let r = send(i, None);
                let j = r.json();
                assert_eq!(r.status, 200, "{family}: {j}");
                assert_eq!(j["record"]["kind"], "wfdb");
                assert_eq!(j["model"]["architecture"], family);
                let p = j["probabilities"].as_array().unwrap();
                assert_eq!(p.len(), 5, "{j}");
                for x in p {
                    let v = x["p"].as_f64().unwrap();
                    assert!((0.0..=1.0).contains(&v), "{j}");
                }
                j
            })
            .collect();
        let distinct: std::collections::BTreeSet<String> = alone
            .iter()
            .map(|j| j["probabilities"].to_string())
            .collect();
        assert_eq!(
            distinct.len(),
            files.len(),
            "{family}: the same probabilities for different records"
        );
        // Different records at once: each answer is its own record's, under its own id.
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..files.len())
                .map(|t| {
                    let (send, files) = (&send, &files);
                    sc.spawn(move || {
                        // Client t sends the records in its own rotation.
                        let i = (t + 1) % files.len();
                        let id = format!("{family}-client{t}");
                        (i, id.clone(), send(i, Some(&id)))
                    })
                })
                .collect();
            for h in handles {
                let (i, id, r) = h.join().unwrap();
                let j = r.json();
                assert_eq!(r.status, 200, "{id}: {j}");
                assert_eq!(j["request_id"], id.as_str());
                assert_eq!(j["record"]["name"], records[i].0);
                assert_eq!(j["probabilities"], alone[i]["probabilities"], "{id}");
                assert_eq!(j["answer"], alone[i]["answer"], "{id}");
            }
        });

        // The rendered page of the first answer, sent back as an image, reads too.
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(alone[0]["image_png"].as_str().unwrap())
            .unwrap();
        let r = interpret(server.addr, &[Part::File("page.png", &png)], None);
        let j = r.json();
        assert_eq!(r.status, 200, "{family}: {j}");
        assert_eq!(j["record"]["kind"], "image");
        assert_eq!(j["probabilities"].as_array().unwrap().len(), 5, "{j}");
        // Not an image: a 4xx naming the problem, and the server goes on answering.
        interpret(server.addr, &[Part::File("page.png", b"not a png")], None)
            .expect_error(422, "page.png");
        assert_eq!(request(server.addr, "GET", "/readyz", &[], b"").status, 200);
    }
    assert_ne!(versions[0], versions[1]);
}
