//! A minimal blocking HTTP/1.1 client for the service's own load generator and tests: one
//! request per connection (`Connection: close`), multipart bodies built by hand. Not a
//! general client: it exists so `bench serve` and the tests can also send what a real
//! client would not (cut-off bodies, odd headers) over a plain socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The boundary of the bodies [`multipart`] builds.
pub const BOUNDARY: &str = "evlClientBoundary7MA4YWxkTrZu0gW";

/// One part of a multipart body.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// A file field `file` with this file name and contents.
    File(&'a str, &'a [u8]),
    /// A text field.
    Field(&'a str, &'a str),
}

/// A multipart/form-data body of `parts` (boundary [`BOUNDARY`]).
pub fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match p {
            Part::File(name, data) => {
                out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(data);
            }
            Part::Field(name, value) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                    .as_bytes(),
            ),
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Parse a whole HTTP/1.1 response (the connection having been closed by the server).
pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("no end of headers in {} bytes", raw.len())))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| bad(e.to_string()))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no status line in {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// Send one request and read the whole response (up to `timeout` per read).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let _ = s.set_nodelay(true);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    // The server may answer (413) and close before the whole body is sent: read anyway.
    let _ = s.write_all(&msg);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// `POST /v1/interpret` with `parts`, optionally with an `X-Request-Id`.
pub fn interpret(
    addr: SocketAddr,
    parts: &[Part<'_>],
    id: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let mut headers = vec![("Content-Type", ct.as_str())];
    if let Some(id) = id {
        headers.push(("X-Request-Id", id));
    }
    request(
        addr,
        "POST",
        "/v1/interpret",
        &headers,
        &multipart(parts),
        timeout,
    )
}
