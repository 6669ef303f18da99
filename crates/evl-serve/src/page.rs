//! The web page served at `/`: one self-contained HTML file (styles and script inline,
//! nothing fetched from elsewhere) that uploads a record to `/v1/interpret` and shows the
//! rendered ECG beside the model's findings.

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
