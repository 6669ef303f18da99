//! ECG records as paper images, the way ECG-Image-Kit (and so PULSE's ECGInstruct) prints
//! them: a 3x4 layout (I/II/III, aVR/aVL/aVF, V1-V3, V4-V6, 2.5 s each) above a full-length
//! lead II rhythm strip, 25 mm/s and 10 mm/mV on red millimetre paper, lead labels and a 1 mV
//! calibration pulse; optional distortions (rotation, noise, colour jitter, creases, blur).
//!
//! A [`Renderer`] caches the empty grid for its configuration, so rendering a record is a
//! copy plus the traces: fast enough to render on the fly inside a training loop.

mod font;

use ecg_io::{Lead, Record};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Errors of rendering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot produce an image.
    #[error("render option `{field}`: {what}")]
    Config {
        /// Option.
        field: &'static str,
        /// Problem.
        what: String,
    },
    /// The record lacks what the layout needs.
    #[error("record `{record}`: {what}")]
    Record {
        /// Record name.
        record: String,
        /// Problem.
        what: String,
    },
    /// Writing the image failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: image::ImageError,
    },
    /// An encoded image that does not decode, or is past the decoder's limits.
    #[error("{name}: {what}")]
    Decode {
        /// The image's name (its file name).
        name: String,
        /// Problem.
        what: String,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Optional image distortions (all off by default), drawn from `seed`.
#[derive(Debug, Clone, PartialEq)]
pub struct Distortions {
    /// Maximum rotation in degrees (uniform in +-).
    pub rotation_deg: f32,
    /// Standard deviation of additive pixel noise (0-255 scale).
    pub noise_sd: f32,
    /// Maximum relative per-channel gain change.
    pub color_jitter: f32,
    /// Number of crease lines.
    pub creases: u32,
    /// Box-blur radius in pixels (0 = none).
    pub blur_px: u32,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Default for Distortions {
    fn default() -> Self {
        Distortions {
            rotation_deg: 0.0,
            noise_sd: 0.0,
            color_jitter: 0.0,
            creases: 0,
            blur_px: 0,
            seed: 0,
        }
    }
}

/// Rendering settings. Defaults: US-letter landscape at 200 dpi like PULSE's images.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderConfig {
    /// Dots per inch.
    pub dpi: f32,
    /// Paper width and height in mm.
    pub paper_mm: (f32, f32),
    /// Paper speed, mm/s.
    pub speed_mm_s: f32,
    /// Gain, mm/mV.
    pub gain_mm_mv: f32,
    /// Trace width in mm.
    pub line_mm: f32,
    /// Draw the red grid.
    pub grid: bool,
    /// Convert to gray levels at the end.
    pub grayscale: bool,
    /// Text printed in the top margin (e.g. `SYNTHETIC`), if any.
    pub banner: Option<String>,
    /// Distortions.
    pub distortions: Distortions,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            dpi: 200.0,
            paper_mm: (279.4, 215.9),
            speed_mm_s: 25.0,
            gain_mm_mv: 10.0,
            line_mm: 0.3,
            grid: true,
            grayscale: false,
            banner: None,
            distortions: Distortions::default(),
        }
    }
}

const PAPER: [u8; 3] = [255, 250, 250];
const MINOR: [u8; 3] = [248, 196, 196];
const MAJOR: [u8; 3] = [236, 120, 120];
const INK: [u8; 3] = [0, 0, 0];

/// Rows of the 3x4 layout: leads per column (each 2.5 s of consecutive time).
pub const LAYOUT_3X4: [[Lead; 4]; 3] = [
    [Lead::I, Lead::AVR, Lead::V1, Lead::V4],
    [Lead::II, Lead::AVL, Lead::V2, Lead::V5],
    [Lead::III, Lead::AVF, Lead::V3, Lead::V6],
];

/// A renderer with its grid cached.
#[derive(Debug, Clone)]
pub struct Renderer {
    cfg: RenderConfig,
    background: RgbImage,
    px_mm: f32,
}

fn blend(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3], a: f32) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 || a <= 0.0 {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    let a = a.min(1.0);
    for (ch, &ci) in p.0.iter_mut().zip(&c) {
        *ch = (*ch as f32 * (1.0 - a) + ci as f32 * a + 0.5) as u8;
    }
}

impl Renderer {
    /// Check the configuration and draw the empty paper.
    pub fn new(cfg: RenderConfig) -> Result<Renderer> {
        if !(cfg.dpi >= 20.0 && cfg.dpi <= 1200.0) {
            return Err(Error::Config {
                field: "dpi",
                what: format!("{} is outside 20..=1200", cfg.dpi),
            });
        }
        if cfg.paper_mm.0 < 100.0 || cfg.paper_mm.1 < 80.0 {
            return Err(Error::Config {
                field: "paper_mm",
                what: "the 3x4 layout needs at least 100 x 80 mm".into(),
            });
        }
        let px_mm = cfg.dpi / 25.4;
        let w = (cfg.paper_mm.0 * px_mm).round() as u32;
        let h = (cfg.paper_mm.1 * px_mm).round() as u32;
        let mut bg = RgbImage::from_pixel(w, h, Rgb(PAPER));
        if cfg.grid {
            // Minor lines each mm, major each 5 mm; thin lines blended by coverage so low
            // resolutions keep a faint grid instead of aliasing.
            let minor_w = (0.1 * px_mm).max(0.5);
            let major_w = (0.2 * px_mm).max(0.8);
            for (step, width, color) in [(1usize, minor_w, MINOR), (5, major_w, MAJOR)] {
                let mut mm = 0usize;
                while (mm as f32) <= cfg.paper_mm.0 {
                    let x = mm as f32 * px_mm;
                    for y in 0..h {
                        line_px(&mut bg, x, width, |img, xi, a| {
                            blend(img, xi, y as i64, color, a)
                        });
                    }
                    mm += step;
                }
                let mut mm = 0usize;
                while (mm as f32) <= cfg.paper_mm.1 {
                    let y = mm as f32 * px_mm;
                    for x in 0..w {
                        line_px(&mut bg, y, width, |img, yi, a| {
                            blend(img, x as i64, yi, color, a)
                        });
                    }
                    mm += step;
                }
            }
        }
        Ok(Renderer {
            cfg,
            background: bg,
            px_mm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RenderConfig {
        &self.cfg
    }

    /// Image size in pixels.
    pub fn size(&self) -> (u32, u32) {
        self.background.dimensions()
    }

    fn text(&self, img: &mut RgbImage, text: &str, x_mm: f32, y_mm: f32, height_mm: f32) {
        let scale = ((height_mm * self.px_mm) / 7.0).round().max(1.0) as u32;
        let (x0, y0) = ((x_mm * self.px_mm) as i64, (y_mm * self.px_mm) as i64);
        font::draw_text(text, scale, |x, y| {
            blend(img, x0 + x as i64, y0 + y as i64, INK, 1.0)
        });
    }

    /// Draw `signal` (mV) sampled at `fs` from `t0` for `dur` seconds, starting at `x_mm` on the
    /// baseline `y_mm`.
    #[allow(clippy::too_many_arguments)]
    fn trace(
        &self,
        img: &mut RgbImage,
        signal: &[f32],
        fs: f64,
        t0: f64,
        dur: f64,
        x_mm: f32,
        y_mm: f32,
    ) {
        let k0 = (t0 * fs).round() as usize;
        let k1 = (((t0 + dur) * fs).round() as usize).min(signal.len());
        if k1 <= k0 + 1 {
            return;
        }
        let px = self.px_mm;
        let xs = |k: usize| (x_mm + ((k - k0) as f64 / fs) as f32 * self.cfg.speed_mm_s) * px;
        let ys = |v: f32| {
            let v = if v.is_finite() { v } else { 0.0 };
            (y_mm - v * self.cfg.gain_mm_mv) * px
        };
        let half = (self.cfg.line_mm * px * 0.5).max(0.5);
        let mut xa = xs(k0);
        let mut ya = ys(signal[k0]);
        for (k, &v) in signal.iter().enumerate().take(k1).skip(k0 + 1) {
            let (xb, yb) = (xs(k), ys(v));
            // One vertical span per pixel column the segment crosses.
            let c0 = xa.floor() as i64;
            let c1 = xb.floor() as i64;
            for c in c0..=c1 {
                let cl = (c as f32).max(xa);
                let cr = ((c + 1) as f32).min(xb).max(cl);
                let t = |x: f32| if xb > xa { (x - xa) / (xb - xa) } else { 0.0 };
                let y1 = ya + (yb - ya) * t(cl);
                let y2 = ya + (yb - ya) * t(cr);
                let (lo, hi) = (y1.min(y2) - half, y1.max(y2) + half);
                for y in lo.floor() as i64..hi.ceil() as i64 {
                    let cover = ((y + 1) as f32).min(hi) - (y as f32).max(lo);
                    blend(img, c, y, INK, cover);
                }
            }
            xa = xb;
            ya = yb;
        }
    }

    fn calibration(&self, img: &mut RgbImage, x_mm: f32, y_mm: f32) {
        // 1 mV for 0.2 s: up 10 mm, across 5 mm, down.
        let w = 0.2 * self.cfg.speed_mm_s;
        let h = self.cfg.gain_mm_mv;
        let fs = 1000.0;
        let n = (2.0 * 0.2 * fs) as usize;
        let pulse: Vec<f32> = (0..n)
            .map(|k| {
                if k > n / 8 && k < n / 8 + n / 2 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let dur = n as f64 / fs;
        let speed = (w * 2.0) / dur as f32;
        let r = Renderer {
            cfg: RenderConfig {
                speed_mm_s: speed,
                gain_mm_mv: h,
                ..self.cfg.clone()
            },
            background: RgbImage::new(0, 0),
            px_mm: self.px_mm,
        };
        r.trace(img, &pulse, fs, 0.0, dur, x_mm, y_mm);
    }

    /// Render a record: 3x4 leads plus a lead II rhythm strip, first 10 s (or less).
    pub fn render(&self, record: &Record) -> Result<RgbImage> {
        let mut img = self.background.clone();
        self.render_into(record, &mut img)?;
        Ok(img)
    }

    /// Render into an image of this renderer's size that already holds the background.
    pub fn render_into(&self, record: &Record, img: &mut RgbImage) -> Result<()> {
        if record.fs <= 0.0 || record.n_samples < 2 {
            return Err(Error::Record {
                record: record.name.clone(),
                what: "no samples to draw".into(),
            });
        }
        let leads = record.standard_12_mv();
        if leads.iter().all(Option::is_none) {
            return Err(Error::Record {
                record: record.name.clone(),
                what: "none of the 12 standard leads is present".into(),
            });
        }
        let (pw, ph) = self.cfg.paper_mm;
        let seg_s = 2.5f64;
        let strip_mm = 4.0 * seg_s as f32 * self.cfg.speed_mm_s;
        let x0 = ((pw - strip_mm) / 2.0 + 6.0).max(14.0);
        let top = 22.0f32.min(ph * 0.1);
        let row_h = (ph - top - 8.0) / 4.0;
        let base = |row: usize| top + row_h * (row as f32 + 0.5);
        if let Some(b) = &self.cfg.banner {
            self.text(img, b, x0, 6.0, 4.0);
        }
        let spec = format!(
            "{}mm/s {}mm/mV {}Hz",
            self.cfg.speed_mm_s, self.cfg.gain_mm_mv, record.fs
        );
        self.text(img, &spec, x0 + strip_mm - 75.0, 6.0, 3.0);
        for (row, lrow) in LAYOUT_3X4.iter().enumerate() {
            let y = base(row);
            self.calibration(img, x0 - 12.0, y);
            for (col, lead) in lrow.iter().enumerate() {
                let xs = x0 + col as f32 * seg_s as f32 * self.cfg.speed_mm_s;
                if let Some(sig) = &leads[lead.standard_index().expect("standard lead")] {
                    self.trace(img, sig, record.fs, col as f64 * seg_s, seg_s, xs, y);
                }
                self.text(img, lead.name(), xs + 1.0, y - 0.45 * row_h + 1.0, 3.0);
                if col > 0 {
                    // Lead change marker.
                    let x = (xs * self.px_mm) as i64;
                    let (ya, yb) = (
                        ((y - 3.0) * self.px_mm) as i64,
                        ((y + 3.0) * self.px_mm) as i64,
                    );
                    for yy in ya..yb {
                        blend(img, x, yy, INK, 1.0);
                    }
                }
            }
        }
        let y = base(3);
        self.calibration(img, x0 - 12.0, y);
        if let Some(sig) = &leads[1] {
            self.trace(img, sig, record.fs, 0.0, 4.0 * seg_s, x0, y);
        }
        self.text(img, "II", x0 + 1.0, y - 0.45 * row_h + 1.0, 3.0);
        self.distort(img);
        if self.cfg.grayscale {
            for p in img.pixels_mut() {
                let g =
                    (0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32) as u8;
                p.0 = [g, g, g];
            }
        }
        Ok(())
    }

    fn distort(&self, img: &mut RgbImage) {
        let d = &self.cfg.distortions;
        if *d == Distortions::default() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(d.seed);
        let (w, h) = img.dimensions();
        for _ in 0..d.creases {
            // A pale fold line across the page, horizontal or vertical.
            let vertical = rng.random_bool(0.5);
            let pos = rng.random_range(0..if vertical { w } else { h }) as i64;
            let width = (0.6 * self.px_mm).max(1.0) as i64;
            for o in -width..=width {
                let a = 0.35 * (1.0 - (o.abs() as f32 / (width + 1) as f32));
                if vertical {
                    for y in 0..h {
                        blend(img, pos + o, y as i64, [255, 255, 255], a);
                    }
                } else {
                    for x in 0..w {
                        blend(img, x as i64, pos + o, [255, 255, 255], a);
                    }
                }
            }
        }
        if d.rotation_deg != 0.0 {
            let ang = rng
                .random_range(-d.rotation_deg..=d.rotation_deg)
                .to_radians();
            let src = img.clone();
            let (s, c) = ang.sin_cos();
            let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let (sx, sy) = (c * dx + s * dy + cx, -s * dx + c * dy + cy);
                    img.put_pixel(x, y, bilinear(&src, sx, sy));
                }
            }
        }
        if d.blur_px > 0 {
            box_blur(img, d.blur_px);
        }
        if d.color_jitter > 0.0 || d.noise_sd > 0.0 {
            let j = d.color_jitter;
            let gains: [f32; 3] = std::array::from_fn(|_| 1.0 + rng.random_range(-j..=j.max(0.0)));
            for p in img.pixels_mut() {
                for (ch, g) in p.0.iter_mut().zip(gains) {
                    let n = if d.noise_sd > 0.0 {
                        // Sum of uniforms: cheap, close to Gaussian.
                        let u: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                        u * d.noise_sd * 1.732
                    } else {
                        0.0
                    };
                    *ch = (*ch as f32 * g + n).clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

/// Pixel columns/rows covered by a line of `width` centred at `pos`, with coverage.
fn line_px(img: &mut RgbImage, pos: f32, width: f32, mut f: impl FnMut(&mut RgbImage, i64, f32)) {
    let (lo, hi) = (pos - width / 2.0, pos + width / 2.0);
    for i in lo.floor() as i64..hi.ceil() as i64 {
        let cov = ((i + 1) as f32).min(hi) - (i as f32).max(lo);
        f(img, i, cov);
    }
}

fn bilinear(src: &RgbImage, x: f32, y: f32) -> Rgb<u8> {
    let (w, h) = src.dimensions();
    if x < 0.0 || y < 0.0 || x >= (w - 1) as f32 || y >= (h - 1) as f32 {
        return Rgb([255, 255, 255]);
    }
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let p = |xx, yy| src.get_pixel(xx, yy).0;
    let (a, b, c, d) = (p(x0, y0), p(x0 + 1, y0), p(x0, y0 + 1), p(x0 + 1, y0 + 1));
    Rgb(std::array::from_fn(|i| {
        let top = a[i] as f32 * (1.0 - fx) + b[i] as f32 * fx;
        let bot = c[i] as f32 * (1.0 - fx) + d[i] as f32 * fx;
        (top * (1.0 - fy) + bot * fy + 0.5) as u8
    }))
}

fn box_blur(img: &mut RgbImage, r: u32) {
    let (w, h) = img.dimensions();
    let r = r as i64;
    for horizontal in [true, false] {
        let src = img.clone();
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut acc = [0u32; 3];
                let mut n = 0;
                for o in -r..=r {
                    let (xx, yy) = if horizontal { (x + o, y) } else { (x, y + o) };
                    if xx >= 0 && yy >= 0 && xx < w as i64 && yy < h as i64 {
                        let p = src.get_pixel(xx as u32, yy as u32).0;
                        for i in 0..3 {
                            acc[i] += p[i] as u32;
                        }
                        n += 1;
                    }
                }
                img.put_pixel(
                    x as u32,
                    y as u32,
                    Rgb(std::array::from_fn(|i| (acc[i] / n) as u8)),
                );
            }
        }
    }
}

/// Render and write a PNG.
pub fn render_png(renderer: &Renderer, record: &Record, path: &std::path::Path) -> Result<()> {
    use image::ImageEncoder;
    let img = renderer.render(record)?;
    let file = std::fs::File::create(path).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: image::ImageError::IoError(e),
    })?;
    // Best compression with adaptive filtering: a third of the size of the fast default
    // on ECG paper.
    image::codecs::png::PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Image as `[3, h, w]` floats in `[0, 1]` (channel-major), ready for a vision encoder.
pub fn to_chw_f32(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c] as f32 / 255.0;
        }
    }
    out
}

/// Largest image side decoded by [`decode_image`], pixels (a 12-lead page at 600 dpi is
/// about 7,000).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest allocation [`decode_image`] lets the decoder make, bytes: a small compressed file
/// that claims a huge image is refused before memory is taken (a decompression bomb).
pub const MAX_IMAGE_ALLOC: u64 = 512 << 20;

/// Decode an encoded image of ECG paper (PNG or JPEG, recognised from the bytes) into RGB,
/// with bounded dimensions and allocation; `name` names it in errors. This is the one path
/// by which images from outside (files, uploads) enter the toolkit.
pub fn decode_image(name: &str, bytes: &[u8]) -> Result<RgbImage> {
    let bad = |what: String| Error::Decode {
        name: name.to_string(),
        what,
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad(
            "not an image in a format this build decodes (PNG or JPEG)".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| bad(e.to_string()))?.to_rgb8();
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("an empty image".into()));
    }
    Ok(img)
}
