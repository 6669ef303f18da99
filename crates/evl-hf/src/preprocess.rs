//! Image preprocessing of the paper's two vision-language families, reproducing Hugging Face
//! `transformers` 5.25 without a tensor framework.
//!
//! - [`QwenImageProcessor`]: `Qwen2VLImageProcessor` as Qwen2-VL and Qwen3-VL use it
//!   (`smart_resize`, bicubic resize, rescale and normalise, then the flat
//!   `[n_patches, C * T * P * P]` patch layout of the patch embedding);
//! - [`LlavaNextImageProcessor`]: `LlavaNextImageProcessor` (anyres: the best grid pinpoint,
//!   resize keeping the aspect ratio, centred zero padding, `crop_size` tiles, with the whole
//!   image squeezed to one tile in front), plus the pure arithmetic the model and processor
//!   share: [`select_best_resolution`], [`anyres_grid_shape`], [`unpad_region`] and
//!   [`llava_next_num_image_tokens`].
//!
//! # Which transformers code this follows
//!
//! In transformers 5 `AutoProcessor` picks the *torchvision* backend of an image processor
//! whenever torchvision is installed (`Qwen2VLImageProcessor` and `LlavaNextImageProcessor` are
//! `TorchvisionBackend` classes; the PIL variants are the `...Pil` classes). That backend turns
//! the PIL image into a `uint8` tensor and resizes it with `torchvision.transforms.v2.functional
//! .resize(antialias=True)`, which on the CPU for `uint8` bicubic input runs PyTorch's own 8-bit
//! separable resampler (`_upsample_bicubic2d_aa`). That resampler is modelled on Pillow's
//! (same kernel placement, horizontal pass first, 8-bit intermediate image) but quantises the
//! kernel weights to `int16` with a precision chosen from the largest weight, where Pillow uses
//! 22 fraction bits in `int32`. The two therefore disagree by one 8-bit level on about 2% of the
//! pixels. [`resize_bicubic`] implements both ([`ResizeBackend`]); the default,
//! [`ResizeBackend::Torchvision`], reproduces the stored reference bit for bit: maximum
//! absolute difference 0 on `qwen3_vl_tiny` and `llava_next_tiny` (case tolerance 1e-5).
//! Pillow's resize is off by one 8-bit level on 1.72% (Qwen3-VL) and 0.43% (LLaVA-NeXT) of the
//! values, and by two levels on 2 of LLaVA-NeXT's 1.7 million.
//! No crate was used for the resize: none reproduces PyTorch's `int16` quantisation, and the
//! algorithm is a few dozen lines.
//!
//! After the resize the torchvision backend fuses rescale and normalise into one `float32`
//! step, `(x - mean * 255) / (std * 255)` with `mean * 255` and `std * 255` rounded to `f32`;
//! [`QwenImageProcessor`] and [`LlavaNextImageProcessor`] do the same operations in the same
//! precision, so their values equal the reference exactly, not just within a tolerance.
//!
//! Images are converted to RGB as transformers' `convert_to_rgb` does: an image with an alpha
//! channel (or a transparent colour) is composited onto opaque white with Pillow's integer
//! `alpha_composite` arithmetic, others are expanded to RGB.

use image::{DynamicImage, RgbImage};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading a processor configuration or an image.
///
/// Each variant names the file (or, for an image built in memory, a label) it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not an image this crate can decode (PNG), or is corrupt.
    #[error("{}: not a readable image: {source}", .path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// A configuration file is not valid JSON.
    #[error("{}: not valid JSON: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration file lacks a field the preprocessing needs.
    #[error("{}: missing field `{field}`", .path.display())]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field, dotted for nested objects (`image_processor.size.shortest_edge`).
        field: String,
    },
    /// A configuration field has the wrong type or an unsupported value.
    #[error("{}: field `{field}`: {reason}", .path.display())]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field, dotted for nested objects.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint folder has no image processor configuration.
    #[error("{}: neither preprocessor_config.json nor processor_config.json is present", .dir.display())]
    NoConfig {
        /// The folder.
        dir: PathBuf,
    },
    /// An image cannot be preprocessed (size, aspect ratio, pixel format).
    #[error("{image}: {reason}")]
    BadImage {
        /// The image file, or a label for an image built in memory.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The label used in errors about images that were not read from a file.
const IN_MEMORY: &str = "in-memory image";

fn bad_image(image: &str, reason: impl Into<String>) -> Error {
    Error::BadImage {
        image: image.to_string(),
        reason: reason.into(),
    }
}

// ------------------------------------------------------------------------------------------
// Loading and RGB conversion
// ------------------------------------------------------------------------------------------

/// Reads and decodes an image file (the format is guessed from its content).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    reader.decode().map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an image file and converts it to 8-bit RGB like transformers' `convert_to_rgb`.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    to_rgb(&load_image(path)?, &path.display().to_string())
}

/// transformers' `convert_to_rgb`: an image with alpha is composited onto opaque white with
/// Pillow's `Image.alpha_composite` (integer arithmetic, reproduced exactly), any other image
/// is expanded to RGB (grey replicated to the three channels).
///
/// 16-bit images are reduced to 8 bits as Pillow 13 opens them (checked on PNGs): RGB, RGBA
/// and grey+alpha keep their high byte, plain grey (Pillow's mode `I;16`) is clamped at 255.
/// Floating-point images are refused. `label` names the image in errors.
pub fn to_rgb(image: &DynamicImage, label: &str) -> Result<RgbImage> {
    let (width, height) = (image.width(), image.height());
    // Every decodable integer format as 8-bit RGBA plus whether alpha was present.
    let (rgba, has_alpha): (Vec<u8>, bool) = match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => (image.to_rgba8().into_raw(), image.color().has_alpha()),
        // Pillow opens 16-bit grey as mode "I;16", whose conversion to RGB clamps at 255.
        DynamicImage::ImageLuma16(_) => {
            let wide = image.to_rgba16().into_raw();
            let clamped = wide.iter().map(|&v| v.min(255) as u8).collect();
            (clamped, false)
        }
        // Pillow decodes 16-bit RGB(A) and grey+alpha PNGs to 8 bits by their high byte.
        DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let wide = image.to_rgba16().into_raw();
            let high = wide.iter().map(|&v| (v >> 8) as u8).collect();
            (high, image.color().has_alpha())
        }
        _ => {
            return Err(bad_image(
                label,
                format!("unsupported pixel format {:?}", image.color()),
            ));
        }
    };
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        if has_alpha {
            let [r, g, b] = composite_on_white([px[0], px[1], px[2]], px[3]);
            rgb.extend_from_slice(&[r, g, b]);
        } else {
            rgb.extend_from_slice(&px[..3]);
        }
    }
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| bad_image(label, "pixel buffer does not match the image size"))
}

/// Pillow's `alpha_composite` of one pixel over an opaque white background
/// (`libImaging/AlphaComposite.c`): blend coefficients with 7 fraction bits and a rounded
/// division by 255 done with shifts.
fn composite_on_white(src: [u8; 3], alpha: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return [255; 3];
    }
    let sa = u32::from(alpha);
    let dst_a = 255u32;
    let blend = dst_a * (255 - sa);
    let out_a255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / out_a255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let div255 = |v: u32| ((v >> 8) + v) >> 8;
    src.map(|c| {
        let t = u32::from(c) * coef1 + 255 * coef2;
        (div255(t + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}

// ------------------------------------------------------------------------------------------
// Resampling
// ------------------------------------------------------------------------------------------

/// Whose 8-bit bicubic antialiasing resize to reproduce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeBackend {
    /// PyTorch's CPU `uint8` path of `interpolate(mode="bicubic", antialias=True)`, which
    /// transformers 5's default torchvision backend calls: `int16` weights whose fraction bits
    /// are the most that keep the largest weight below 2^15. Exact against the reference.
    #[default]
    Torchvision,
    /// Pillow's `Image.resize(..., BICUBIC)` (what transformers' `...Pil` processors and
    /// transformers 4's slow processors call): `int32` weights with 22 fraction bits.
    Pillow,
}

/// The resampling filter of a processor configuration (`resample`, PIL's numbering).
///
/// Only bicubic (3) is implemented: it is what both families' checkpoints use.
const PIL_BICUBIC: i64 = 3;

/// Keys' cubic convolution kernel with a = -0.5, as the two libraries write it (their
/// floating-point expressions differ, so each is kept to reproduce the quantised weights).
fn bicubic(x: f64, backend: ResizeBackend) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    match backend {
        ResizeBackend::Torchvision => {
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
            } else {
                0.0
            }
        }
        ResizeBackend::Pillow => {
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
    }
}

/// Fixed-point filter taps of one axis: output `i` reads `len[i]` inputs from `start[i]`.
struct AxisKernel {
    start: Vec<usize>,
    len: Vec<usize>,
    /// `stride` weights per output, the first `len[i]` used.
    weights: Vec<i32>,
    stride: usize,
    /// Fraction bits of `weights`.
    precision: u32,
}

impl AxisKernel {
    /// The antialiasing bicubic kernel from `in_size` to `out_size` samples.
    ///
    /// Both libraries place it the same way: output `i` is centred on input coordinate
    /// `(i + 0.5) * scale`, the filter is stretched by `max(scale, 1)` (support `2 * that`),
    /// the taps are the inputs whose centres fall inside the support (truncating C casts),
    /// and the weights are normalised to sum to one before quantisation.
    fn bicubic(in_size: usize, out_size: usize, backend: ResizeBackend) -> AxisKernel {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        let inv = 1.0 / filter_scale;
        let stride = support.ceil() as usize * 2 + 1;

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut real = vec![0.0f64; out_size * stride];
        let mut largest = 0.0f64;
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // `as i64` truncates toward zero like the C `(int)` casts of both libraries.
            let lo = ((center - support + 0.5) as i64).max(0);
            let hi = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (hi - lo).clamp(0, stride as i64) as usize;
            let taps = &mut real[i * stride..i * stride + n];
            let mut total = 0.0;
            for (j, w) in taps.iter_mut().enumerate() {
                *w = bicubic(((j as i64 + lo) as f64 - center + 0.5) * inv, backend);
                total += *w;
            }
            if total != 0.0 {
                for w in taps.iter_mut() {
                    *w /= total;
                    largest = largest.max(*w);
                }
            }
            start.push(lo as usize);
            len.push(n);
        }

        let precision = match backend {
            // Pillow: PRECISION_BITS = 32 - 8 - 2.
            ResizeBackend::Pillow => 22,
            // PyTorch: the most bits (below 22) for which the largest weight, doubled, still
            // rounds below 2^15, so every weight fits an `int16`.
            ResizeBackend::Torchvision => {
                let mut bits = 0u32;
                while bits < 22 {
                    let next = (0.5 + largest * f64::from(1u32 << (bits + 1))) as i64;
                    if next >= 1 << 15 {
                        break;
                    }
                    bits += 1;
                }
                bits
            }
        };
        let unit = f64::from(1u32 << precision);
        // Round half away from zero, as both libraries' `(int)(w * unit +- 0.5)`.
        let weights = real
            .iter()
            .map(|&w| {
                let v = w * unit;
                if v < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        AxisKernel {
            start,
            len,
            weights,
            stride,
            precision,
        }
    }

    /// One output sample: the fixed-point dot product, rounded, shifted and clamped to 8 bits.
    #[inline]
    fn apply(&self, out: usize, mut sample: impl FnMut(usize) -> u8) -> u8 {
        let taps = &self.weights[out * self.stride..out * self.stride + self.len[out]];
        let mut acc: i64 = if self.precision == 0 {
            0
        } else {
            1 << (self.precision - 1)
        };
        for (j, &w) in taps.iter().enumerate() {
            acc += i64::from(sample(self.start[out] + j)) * i64::from(w);
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Resizes an 8-bit RGB image to `height` x `width` with antialiased bicubic filtering,
/// reproducing `backend` bit for bit.
///
/// Both libraries resample horizontally first into an 8-bit (rounded and clamped)
/// intermediate image, then vertically; an axis whose size does not change is copied.
/// Fails on a zero target size.
pub fn resize_bicubic(
    image: &RgbImage,
    height: usize,
    width: usize,
    backend: ResizeBackend,
) -> Result<RgbImage> {
    resize_labeled(image, height, width, backend, IN_MEMORY)
}

fn resize_labeled(
    image: &RgbImage,
    height: usize,
    width: usize,
    backend: ResizeBackend,
    label: &str,
) -> Result<RgbImage> {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if height == 0 || width == 0 || in_w == 0 || in_h == 0 {
        return Err(bad_image(
            label,
            format!("cannot resize {in_h}x{in_w} to {height}x{width} (height x width)"),
        ));
    }
    let (out_w, out_h) = (
        u32::try_from(width).map_err(|_| bad_image(label, "target width too large"))?,
        u32::try_from(height).map_err(|_| bad_image(label, "target height too large"))?,
    );
    let src = image.as_raw();

    let horizontal = if width != in_w {
        let k = AxisKernel::bicubic(in_w, width, backend);
        let mut out = vec![0u8; in_h * width * 3];
        for y in 0..in_h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for x in 0..width {
                for c in 0..3 {
                    out[(y * width + x) * 3 + c] = k.apply(x, |j| row[j * 3 + c]);
                }
            }
        }
        out
    } else {
        src.clone()
    };

    let vertical = if height != in_h {
        let k = AxisKernel::bicubic(in_h, height, backend);
        let row_len = width * 3;
        let mut out = vec![0u8; height * row_len];
        for y in 0..height {
            for i in 0..row_len {
                out[y * row_len + i] = k.apply(y, |j| horizontal[j * row_len + i]);
            }
        }
        out
    } else {
        horizontal
    };

    RgbImage::from_raw(out_w, out_h, vertical)
        .ok_or_else(|| bad_image(label, "resized buffer does not match its size"))
}

// ------------------------------------------------------------------------------------------
// Rescale and normalise
// ------------------------------------------------------------------------------------------

/// The torchvision backend's rescale/normalise of 8-bit values to `f32`, per channel.
///
/// With both switches on, transformers fuses them (`_fuse_mean_std_and_rescale_factor`):
/// `mean` and `std` become `f32` tensors multiplied by `1 / rescale_factor` in `f32`, and
/// `normalize` computes `(x - mean') / std'` in `f32` (a subtraction, then a division).
#[derive(Clone, Copy, Debug)]
struct Normalizer {
    /// Subtracted from the value (0 when not normalising).
    offset: [f32; 3],
    /// Divides the value (1 when not normalising).
    divisor: [f32; 3],
    /// Multiplies the value (only for rescale without normalise).
    factor: f32,
}

impl Normalizer {
    fn new(
        do_rescale: bool,
        rescale_factor: f64,
        do_normalize: bool,
        mean: [f64; 3],
        std: [f64; 3],
    ) -> Normalizer {
        let identity = Normalizer {
            offset: [0.0; 3],
            divisor: [1.0; 3],
            factor: 1.0,
        };
        match (do_rescale, do_normalize) {
            (true, true) => {
                let inv = (1.0 / rescale_factor) as f32;
                Normalizer {
                    offset: mean.map(|m| m as f32 * inv),
                    divisor: std.map(|s| s as f32 * inv),
                    factor: 1.0,
                }
            }
            (false, true) => Normalizer {
                offset: mean.map(|m| m as f32),
                divisor: std.map(|s| s as f32),
                factor: 1.0,
            },
            (true, false) => Normalizer {
                factor: rescale_factor as f32,
                ..identity
            },
            (false, false) => identity,
        }
    }

    #[inline]
    fn apply(&self, value: u8, channel: usize) -> f32 {
        (f32::from(value) * self.factor - self.offset[channel]) / self.divisor[channel]
    }
}

// ------------------------------------------------------------------------------------------
// Configuration reading
// ------------------------------------------------------------------------------------------

/// The image processor's JSON object with the file it came from, for error messages.
struct Section<'a> {
    path: &'a Path,
    /// Dotted prefix of this object inside the file (`""` or `"image_processor."`).
    prefix: String,
    object: &'a Map<String, Value>,
}

impl<'a> Section<'a> {
    fn field_name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingField {
            path: self.path.to_path_buf(),
            field: self.field_name(key),
        }
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::BadField {
            path: self.path.to_path_buf(),
            field: self.field_name(key),
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.object.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    fn sub(&self, key: &str) -> Result<Section<'a>> {
        let object = self
            .required(key)?
            .as_object()
            .ok_or_else(|| self.bad(key, "expected an object"))?;
        Ok(Section {
            path: self.path,
            prefix: self.field_name(&format!("{key}.")),
            object,
        })
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, got {v}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_of(key, self.required(key)?)
    }

    fn positive(&self, key: &str) -> Result<usize> {
        match self.usize(key)? {
            0 => Err(self.bad(key, "must be positive")),
            n => Ok(n),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(key, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A per-channel triple, given as three numbers or one number for all channels.
    fn triple(&self, key: &str) -> Result<[f64; 3]> {
        let v = self.required(key)?;
        if let Some(x) = v.as_f64() {
            return Ok([x; 3]);
        }
        let items = v
            .as_array()
            .ok_or_else(|| self.bad(key, "expected three numbers"))?;
        match items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>() {
            Some(xs) if xs.len() == 3 => Ok([xs[0], xs[1], xs[2]]),
            _ => Err(self.bad(key, format!("expected three numbers, got {v}"))),
        }
    }

    /// `resample` must be PIL's BICUBIC (3), its default in both processors.
    fn check_bicubic(&self) -> Result<()> {
        match self.get("resample") {
            None => Ok(()),
            Some(v) if v.as_i64() == Some(PIL_BICUBIC) => Ok(()),
            Some(v) => Err(self.bad(
                "resample",
                format!("only 3 (bicubic) is implemented, got {v}"),
            )),
        }
    }

    /// Standard deviations must be non-zero (they divide).
    fn check_std(&self, std: [f64; 3]) -> Result<()> {
        if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(self.bad("image_std", "must be finite and non-zero"));
        }
        Ok(())
    }
}

/// A parsed configuration file.
struct ConfigFile {
    path: PathBuf,
    root: Map<String, Value>,
}

impl ConfigFile {
    fn read(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        match value {
            Value::Object(root) => Ok(ConfigFile {
                path: path.to_path_buf(),
                root,
            }),
            _ => Err(Error::BadField {
                path: path.to_path_buf(),
                field: "(top level)".into(),
                reason: "expected a JSON object".into(),
            }),
        }
    }

    /// The image processor's settings: the nested `image_processor` object of a
    /// `processor_config.json` (transformers 5), or the file itself (the flat
    /// `preprocessor_config.json` that released checkpoints ship).
    fn image_processor(&self) -> Result<Section<'_>> {
        let top = Section {
            path: &self.path,
            prefix: String::new(),
            object: &self.root,
        };
        if top.get("image_processor").is_some() {
            top.sub("image_processor")
        } else {
            Ok(top)
        }
    }
}

/// The processor configuration of a checkpoint folder: `preprocessor_config.json` if present,
/// else `processor_config.json`.
fn config_in_dir(dir: &Path) -> Result<ConfigFile> {
    for name in ["preprocessor_config.json", "processor_config.json"] {
        let path = dir.join(name);
        if path.is_file() {
            return ConfigFile::read(&path);
        }
    }
    Err(Error::NoConfig {
        dir: dir.to_path_buf(),
    })
}

// ------------------------------------------------------------------------------------------
// Qwen2-VL / Qwen3-VL
// ------------------------------------------------------------------------------------------

/// transformers' `smart_resize` of Qwen2-VL (5.25): the size closest to `height` x `width`
/// whose sides are multiples of `factor` and whose area lies in `[min_pixels, max_pixels]`.
///
/// Each side is first rounded to the nearest multiple (Python's `round`, ties to even). If
/// the area is then too large, both sides are divided by `sqrt(h * w / max_pixels)` and
/// floored to multiples (at least `factor`); if too small, multiplied by
/// `sqrt(min_pixels / (h * w))` and ceiled. An aspect ratio above 200 is refused, as in
/// transformers. Returns `(height, width)`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    smart_resize_labeled(height, width, factor, min_pixels, max_pixels, IN_MEMORY)
}

fn smart_resize_labeled(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
    label: &str,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(bad_image(
            label,
            format!("cannot size an image of {height}x{width} to multiples of {factor}"),
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(bad_image(
            label,
            format!("absolute aspect ratio must be smaller than 200, got {ratio}"),
        ));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    let area = (height as f64) * (width as f64);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Qwen2-VL / Qwen3-VL image preprocessing (`Qwen2VLImageProcessor`, transformers 5.25).
#[derive(Clone, Debug, PartialEq)]
pub struct QwenImageProcessor {
    /// `do_resize` (default true): resize with [`smart_resize`]; when false the image's own
    /// sides must already be multiples of `patch_size * merge_size`.
    pub do_resize: bool,
    /// `do_rescale` (default true).
    pub do_rescale: bool,
    /// `rescale_factor` (default 1/255).
    pub rescale_factor: f64,
    /// `do_normalize` (default true).
    pub do_normalize: bool,
    /// `image_mean`, per channel (required: the two model generations differ).
    pub image_mean: [f64; 3],
    /// `image_std`, per channel (required).
    pub image_std: [f64; 3],
    /// `do_convert_rgb` (default true). When false the image must already be 8-bit RGB.
    pub do_convert_rgb: bool,
    /// Smallest area after resizing: `size.shortest_edge`, or the legacy `min_pixels`.
    pub min_pixels: usize,
    /// Largest area after resizing: `size.longest_edge`, or the legacy `max_pixels`.
    pub max_pixels: usize,
    /// `patch_size`: side of one vision patch.
    pub patch_size: usize,
    /// `temporal_patch_size`: frames per patch (a still image is repeated this many times).
    pub temporal_patch_size: usize,
    /// `merge_size`: side of the patch block merged into one language token.
    pub merge_size: usize,
    /// Whose resize to reproduce (not a configuration field).
    pub backend: ResizeBackend,
}

/// The output of [`QwenImageProcessor`]: transformers' `pixel_values` and `image_grid_thw`
/// for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenPixels {
    /// Row-major `[n_patches, patch_dim]`.
    pub values: Vec<f32>,
    /// `grid_t * grid_h * grid_w`.
    pub n_patches: usize,
    /// `channels * temporal_patch_size * patch_size * patch_size`.
    pub patch_dim: usize,
    /// `[grid_t, grid_h, grid_w]` in patches (`grid_t` is 1 for an image).
    pub grid_thw: [usize; 3],
    /// The resized image's `(height, width)` in pixels.
    pub resized: (usize, usize),
}

impl QwenPixels {
    /// Language tokens this image becomes (`<|image_pad|>` count): patches over
    /// `merge_size^2`.
    pub fn n_image_tokens(&self, merge_size: usize) -> usize {
        self.n_patches / (merge_size * merge_size).max(1)
    }
}

impl QwenImageProcessor {
    /// Reads `dir/preprocessor_config.json`, or else `dir/processor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<QwenImageProcessor> {
        Self::from_config(&config_in_dir(dir)?)
    }

    /// Reads one configuration file, flat (`preprocessor_config.json`) or with the settings
    /// nested under `image_processor` (`processor_config.json`).
    pub fn from_file(path: &Path) -> Result<QwenImageProcessor> {
        Self::from_config(&ConfigFile::read(path)?)
    }

    fn from_config(file: &ConfigFile) -> Result<QwenImageProcessor> {
        let s = file.image_processor()?;
        s.check_bicubic()?;
        // transformers: `size` holds the pixel bounds; top-level `min_pixels` / `max_pixels`
        // (older Qwen2-VL configs) override its entries.
        let size = match s.get("size") {
            Some(_) => Some(s.sub("size")?),
            None => None,
        };
        let bound = |legacy: &str, key: &str| -> Result<usize> {
            if let Some(v) = s.get(legacy) {
                return s.usize_of(legacy, v);
            }
            match &size {
                Some(size) => size.usize(key),
                None => Err(s.missing(&format!("size.{key}"))),
            }
        };
        let min_pixels = bound("min_pixels", "shortest_edge")?;
        let max_pixels = bound("max_pixels", "longest_edge")?;
        let image_std = s.triple("image_std")?;
        s.check_std(image_std)?;
        let p = QwenImageProcessor {
            do_resize: s.bool_or("do_resize", true)?,
            do_rescale: s.bool_or("do_rescale", true)?,
            rescale_factor: s.f64_or("rescale_factor", 1.0 / 255.0)?,
            do_normalize: s.bool_or("do_normalize", true)?,
            image_mean: s.triple("image_mean")?,
            image_std,
            do_convert_rgb: s.bool_or("do_convert_rgb", true)?,
            min_pixels,
            max_pixels,
            patch_size: s.positive("patch_size")?,
            temporal_patch_size: s.positive("temporal_patch_size")?,
            merge_size: s.positive("merge_size")?,
            backend: ResizeBackend::default(),
        };
        if p.min_pixels > p.max_pixels {
            return Err(s.bad("size", "shortest_edge (min pixels) exceeds longest_edge"));
        }
        Ok(p)
    }

    /// The `(height, width)` an image of `height` x `width` is resized to.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        self.resized_size_labeled(height, width, IN_MEMORY)
    }

    fn resized_size_labeled(
        &self,
        height: usize,
        width: usize,
        label: &str,
    ) -> Result<(usize, usize)> {
        let factor = self.patch_size * self.merge_size;
        if self.do_resize {
            return smart_resize_labeled(
                height,
                width,
                factor,
                self.min_pixels,
                self.max_pixels,
                label,
            );
        }
        if factor == 0
            || height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(bad_image(
                label,
                format!(
                    "do_resize is false but {height}x{width} is not a multiple of {factor} \
                     (patch_size * merge_size)"
                ),
            ));
        }
        Ok((height, width))
    }

    /// Preprocesses an image file.
    pub fn preprocess_path(&self, path: &Path) -> Result<QwenPixels> {
        let label = path.display().to_string();
        self.preprocess_labeled(&load_image(path)?, &label)
    }

    /// Preprocesses a decoded image.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<QwenPixels> {
        self.preprocess_labeled(image, IN_MEMORY)
    }

    fn preprocess_labeled(&self, image: &DynamicImage, label: &str) -> Result<QwenPixels> {
        let rgb = rgb_for(image, self.do_convert_rgb, label)?;
        self.preprocess_rgb_labeled(&rgb, label)
    }

    /// Preprocesses an 8-bit RGB image (already converted).
    pub fn preprocess_rgb(&self, rgb: &RgbImage) -> Result<QwenPixels> {
        self.preprocess_rgb_labeled(rgb, IN_MEMORY)
    }

    fn preprocess_rgb_labeled(&self, rgb: &RgbImage, label: &str) -> Result<QwenPixels> {
        let (h0, w0) = (rgb.height() as usize, rgb.width() as usize);
        let (height, width) = self.resized_size_labeled(h0, w0, label)?;
        let resized;
        let image = if (height, width) == (h0, w0) {
            rgb
        } else {
            resized = resize_labeled(rgb, height, width, self.backend, label)?;
            &resized
        };
        let norm = Normalizer::new(
            self.do_rescale,
            self.rescale_factor,
            self.do_normalize,
            self.image_mean,
            self.image_std,
        );
        Ok(patchify(
            image,
            &norm,
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
        ))
    }
}

/// Qwen2-VL's flat patch layout (`Qwen2VLImageProcessor.patchify`).
///
/// transformers views the normalised `[C, H, W]` image as
/// `[C, gh/m, m, P, gw/m, m, P]`, permutes it to `[gh/m, gw/m, m, m, C, P, P]`, inserts the
/// temporal axis after `C` by repeating the single frame `T` times, and flattens to
/// `[gh * gw, C * T * P * P]`. So patches run over 2x2 (merge) blocks in row-major block
/// order, row-major inside a block, and each patch holds channel, frame, row, column.
fn patchify(image: &RgbImage, norm: &Normalizer, p: usize, m: usize, t: usize) -> QwenPixels {
    let (height, width) = (image.height() as usize, image.width() as usize);
    let (gh, gw) = (height / p, width / p);
    let patch_dim = 3 * t * p * p;
    let n_patches = gh * gw;
    let src = image.as_raw();
    let mut values = Vec::with_capacity(n_patches * patch_dim);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (row, col) = (bh * m + mh, bw * m + mw);
                    for c in 0..3 {
                        for _frame in 0..t {
                            for y in row * p..(row + 1) * p {
                                for x in col * p..(col + 1) * p {
                                    values.push(norm.apply(src[(y * width + x) * 3 + c], c));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    QwenPixels {
        values,
        n_patches,
        patch_dim,
        grid_thw: [1, gh, gw],
        resized: (height, width),
    }
}

/// The RGB image a processor works on: converted when `do_convert_rgb`, else it must be RGB.
fn rgb_for(image: &DynamicImage, convert: bool, label: &str) -> Result<RgbImage> {
    match image {
        DynamicImage::ImageRgb8(rgb) => Ok(rgb.clone()),
        _ if convert => to_rgb(image, label),
        _ => Err(bad_image(
            label,
            format!(
                "do_convert_rgb is false but the image is {:?}, not 8-bit RGB",
                image.color()
            ),
        )),
    }
}

// ------------------------------------------------------------------------------------------
// LLaVA-NeXT
// ------------------------------------------------------------------------------------------

/// transformers' `select_best_resolution`: the pinpoint `(height, width)` that keeps the most
/// of the image's pixels when it is scaled to fit inside, ties broken by the least unused area.
///
/// For each pinpoint the image is scaled by `min(w / W, h / H)`, each side truncated to an
/// integer, and the effective resolution is that area capped at the original area; the first
/// pinpoint with a strictly larger effective resolution, or an equal one with strictly less
/// waste, wins. `None` for an empty list or an empty image.
pub fn select_best_resolution(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let (oh, ow) = image_size;
    if oh == 0 || ow == 0 {
        return None;
    }
    let original_area = oh as f64 * ow as f64;
    let mut best = None;
    let mut max_effective = 0.0f64;
    let mut min_wasted = f64::INFINITY;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow as f64).min(h as f64 / oh as f64);
        let down_w = (ow as f64 * scale).trunc();
        let down_h = (oh as f64 * scale).trunc();
        let effective = (down_w * down_h).min(original_area);
        let wasted = (w as f64 * h as f64) - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// The anyres tile grid `(rows, cols)` of an image of `(height, width)`: the best pinpoint
/// divided by the tile side (modeling_llava_next's `get_anyres_image_grid_shape`, with
/// `tile_size` the vision tower's `image_size`).
pub fn anyres_grid_shape(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
) -> Option<(usize, usize)> {
    if tile_size == 0 {
        return None;
    }
    let (h, w) = select_best_resolution(image_size, pinpoints)?;
    Some((h / tile_size, w / tile_size))
}

/// The part of the tiled feature grid that LLaVA-NeXT keeps (`unpad_image`): the rows
/// `row_offset..row_offset + rows` and columns `col_offset..col_offset + cols`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpadRegion {
    /// Rows kept.
    pub rows: usize,
    /// Columns kept.
    pub cols: usize,
    /// First row kept.
    pub row_offset: usize,
    /// First column kept.
    pub col_offset: usize,
}

/// Python's `int(round(x, 7))` for the non-negative sizes of [`unpad_region`]: `round` to 7
/// decimals is correctly rounded, as is Rust's `{:.7}` formatting; `int` truncates.
fn int_round7(x: f64) -> i64 {
    let text = format!("{x:.7}");
    text.parse::<f64>().map_or(x.trunc(), f64::trunc) as i64
}

/// LLaVA-NeXT's `unpad_image` arithmetic (modeling) and `_get_unpadded_features` (processor).
///
/// The image was resized to fit the pinpoint and centred with padding, so in a feature grid of
/// `(grid_h, grid_w)` the padding is removed along the side with spare room: if the image is
/// wider than the grid, `new_h = int(round(H * (grid_w / W), 7))` and
/// `pad = (grid_h - new_h) // 2` rows are dropped at the top and at the bottom (so the kept
/// count is `grid_h - 2 * pad`, not `new_h`); otherwise the same with columns.
pub fn unpad_region(image_size: (usize, usize), grid: (usize, usize)) -> UnpadRegion {
    let (oh, ow) = image_size;
    let (gh, gw) = grid;
    let whole = UnpadRegion {
        rows: gh,
        cols: gw,
        row_offset: 0,
        col_offset: 0,
    };
    if oh == 0 || ow == 0 || gh == 0 || gw == 0 {
        return whole;
    }
    let original_aspect = ow as f64 / oh as f64;
    let current_aspect = gw as f64 / gh as f64;
    // Padding is never negative for real inputs; clamping keeps nonsense inputs in range.
    if original_aspect > current_aspect {
        let new_h = int_round7(oh as f64 * (gw as f64 / ow as f64));
        let pad = (gh as i64 - new_h).div_euclid(2).clamp(0, gh as i64 / 2) as usize;
        UnpadRegion {
            rows: gh - 2 * pad,
            row_offset: pad,
            ..whole
        }
    } else {
        let new_w = int_round7(ow as f64 * (gh as f64 / oh as f64));
        let pad = (gw as i64 - new_w).div_euclid(2).clamp(0, gw as i64 / 2) as usize;
        UnpadRegion {
            cols: gw - 2 * pad,
            col_offset: pad,
            ..whole
        }
    }
}

/// Image tokens of one image in LLaVA-NeXT (`LlavaNextProcessor._get_number_of_features`
/// with `vision_feature_select_strategy = "default"`, i.e. the CLS feature dropped):
/// `(tile / patch)^2` for the base view, plus the unpadded grid of the anyres tiles
/// (`rows * cols`) and one `image_newline` per kept row.
///
/// `tile_size` is the processed view's side (336), `patch_size` the vision patch (14).
/// `None` when no pinpoint fits or a size is zero.
pub fn llava_next_num_image_tokens(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
    patch_size: usize,
) -> Option<usize> {
    if patch_size == 0 {
        return None;
    }
    let (rows, cols) = anyres_grid_shape(image_size, pinpoints, tile_size)?;
    let side = tile_size / patch_size;
    let region = unpad_region(image_size, (side * rows, side * cols));
    Some(side * side + region.rows * region.cols + region.rows)
}

/// A resize target as transformers' `size` / `SizeDict` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeSpec {
    /// `{"shortest_edge": s}` (or a bare integer): the short side becomes `s`, the long side
    /// `int(s * long / short)`.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`.
    Exact {
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
}

impl SizeSpec {
    /// The `(height, width)` an image of `(height, width)` is resized to
    /// (`get_resize_output_image_size` with `default_to_square=False`).
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match *self {
            SizeSpec::Exact { height, width } => (height, width),
            SizeSpec::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = if short == 0 {
                    0
                } else {
                    ((s as f64 * long as f64) / short as f64) as usize
                };
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// The square the base view is resized to: `(h, w)` for an exact size, `(s, s)` for a
    /// shortest edge.
    fn base_view(&self) -> (usize, usize) {
        match *self {
            SizeSpec::Exact { height, width } => (height, width),
            SizeSpec::ShortestEdge(s) => (s, s),
        }
    }
}

/// LLaVA-NeXT image preprocessing (`LlavaNextImageProcessor`, transformers 5.25).
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaNextImageProcessor {
    /// `do_resize` (default true): resize every view to `size` before cropping.
    pub do_resize: bool,
    /// `size` (required).
    pub size: SizeSpec,
    /// `do_center_crop` (default true).
    pub do_center_crop: bool,
    /// `crop_size` as `(height, width)` (required; its height is also the tile side).
    pub crop_size: (usize, usize),
    /// `do_rescale` (default true).
    pub do_rescale: bool,
    /// `rescale_factor` (default 1/255).
    pub rescale_factor: f64,
    /// `do_normalize` (default true).
    pub do_normalize: bool,
    /// `image_mean` per channel (required).
    pub image_mean: [f64; 3],
    /// `image_std` per channel (required).
    pub image_std: [f64; 3],
    /// `do_convert_rgb` (default true).
    pub do_convert_rgb: bool,
    /// `image_grid_pinpoints` as `(height, width)` (required; read from `config.json` of the
    /// same folder when the processor files lack it, as in the original LLaVA layout).
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// Whose resize to reproduce (not a configuration field).
    pub backend: ResizeBackend,
}

/// The output of [`LlavaNextImageProcessor`]: one image's `pixel_values` and `image_sizes`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaNextPixels {
    /// Row-major `[n_tiles, 3, crop_h, crop_w]`: the base view, then the tiles row-major.
    pub values: Vec<f32>,
    /// Views: 1 base + `grid.0 * grid.1` tiles.
    pub n_tiles: usize,
    /// `(crop_h, crop_w)` of every view.
    pub tile_size: (usize, usize),
    /// The original `(height, width)`, as `image_sizes` stores it.
    pub image_size: (usize, usize),
    /// The selected pinpoint `(height, width)`.
    pub best_resolution: (usize, usize),
    /// Tile grid `(rows, cols)`.
    pub grid: (usize, usize),
}

impl LlavaNextImageProcessor {
    /// Reads `dir/preprocessor_config.json`, or else `dir/processor_config.json`; the
    /// pinpoints come from `dir/config.json` when the processor file lacks them.
    pub fn from_dir(dir: &Path) -> Result<LlavaNextImageProcessor> {
        let file = config_in_dir(dir)?;
        let model_config = dir.join("config.json");
        let fallback = if model_config.is_file() {
            Some(ConfigFile::read(&model_config)?)
        } else {
            None
        };
        Self::from_config(&file, fallback.as_ref())
    }

    /// Reads one configuration file, flat or with the settings nested under
    /// `image_processor`.
    pub fn from_file(path: &Path) -> Result<LlavaNextImageProcessor> {
        Self::from_config(&ConfigFile::read(path)?, None)
    }

    fn from_config(
        file: &ConfigFile,
        model_config: Option<&ConfigFile>,
    ) -> Result<LlavaNextImageProcessor> {
        let s = file.image_processor()?;
        s.check_bicubic()?;
        let size = match s.required("size")? {
            v if v.is_u64() => SizeSpec::ShortestEdge(s.positive("size")?),
            Value::Object(_) => {
                let size = s.sub("size")?;
                if size.get("shortest_edge").is_some() {
                    if size.get("longest_edge").is_some() {
                        return Err(size.bad(
                            "longest_edge",
                            "shortest_edge with longest_edge is not implemented for LLaVA-NeXT",
                        ));
                    }
                    SizeSpec::ShortestEdge(size.positive("shortest_edge")?)
                } else {
                    SizeSpec::Exact {
                        height: size.positive("height")?,
                        width: size.positive("width")?,
                    }
                }
            }
            v => return Err(s.bad("size", format!("expected an integer or object, got {v}"))),
        };
        let crop_size = match s.required("crop_size")? {
            v if v.is_u64() => {
                let n = s.positive("crop_size")?;
                (n, n)
            }
            _ => {
                let crop = s.sub("crop_size")?;
                (crop.positive("height")?, crop.positive("width")?)
            }
        };
        let pinpoints = match (s.get("image_grid_pinpoints"), model_config) {
            (Some(v), _) => parse_pinpoints(&s, "image_grid_pinpoints", v)?,
            (None, Some(model)) => {
                let top = Section {
                    path: &model.path,
                    prefix: String::new(),
                    object: &model.root,
                };
                match top.get("image_grid_pinpoints") {
                    Some(v) => parse_pinpoints(&top, "image_grid_pinpoints", v)?,
                    None => return Err(s.missing("image_grid_pinpoints")),
                }
            }
            (None, None) => return Err(s.missing("image_grid_pinpoints")),
        };
        let image_std = s.triple("image_std")?;
        s.check_std(image_std)?;
        Ok(LlavaNextImageProcessor {
            do_resize: s.bool_or("do_resize", true)?,
            size,
            do_center_crop: s.bool_or("do_center_crop", true)?,
            crop_size,
            do_rescale: s.bool_or("do_rescale", true)?,
            rescale_factor: s.f64_or("rescale_factor", 1.0 / 255.0)?,
            do_normalize: s.bool_or("do_normalize", true)?,
            image_mean: s.triple("image_mean")?,
            image_std,
            do_convert_rgb: s.bool_or("do_convert_rgb", true)?,
            image_grid_pinpoints: pinpoints,
            backend: ResizeBackend::default(),
        })
    }

    /// The tile side: `crop_size.height` (transformers' `patch_size` in `_preprocess`).
    pub fn tile_side(&self) -> usize {
        self.crop_size.0
    }

    /// Image tokens for an image of `(height, width)` with a vision tower of `patch_size`
    /// (see [`llava_next_num_image_tokens`]).
    pub fn num_image_tokens(&self, image_size: (usize, usize), patch_size: usize) -> Option<usize> {
        llava_next_num_image_tokens(
            image_size,
            &self.image_grid_pinpoints,
            self.tile_side(),
            patch_size,
        )
    }

    /// Preprocesses an image file.
    pub fn preprocess_path(&self, path: &Path) -> Result<LlavaNextPixels> {
        let label = path.display().to_string();
        self.preprocess_labeled(&load_image(path)?, &label)
    }

    /// Preprocesses a decoded image.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<LlavaNextPixels> {
        self.preprocess_labeled(image, IN_MEMORY)
    }

    fn preprocess_labeled(&self, image: &DynamicImage, label: &str) -> Result<LlavaNextPixels> {
        let rgb = rgb_for(image, self.do_convert_rgb, label)?;
        self.preprocess_rgb_labeled(&rgb, label)
    }

    /// Preprocesses an 8-bit RGB image (already converted).
    pub fn preprocess_rgb(&self, rgb: &RgbImage) -> Result<LlavaNextPixels> {
        self.preprocess_rgb_labeled(rgb, IN_MEMORY)
    }

    /// transformers' `_get_image_patches` then `_preprocess`:
    ///
    /// 1. the best pinpoint for the original size ([`select_best_resolution`]);
    /// 2. resize keeping the aspect ratio (`get_patch_output_size`: the side with the smaller
    ///    scale fills the pinpoint, the other is `min(ceil(side * scale), target)`);
    /// 3. pad to the pinpoint with 0 on the 8-bit image, before normalisation (so padding
    ///    becomes `-mean / std`), centred: `divmod(spare, 2)` before, the rest after;
    /// 4. cut into `crop_size.height` squares, row-major;
    /// 5. the base view: the original resized straight to `(s, s)` (aspect not kept), first;
    /// 6. every view resized to `size` (a no-op for square views when `s` is the tile side),
    ///    centre-cropped to `crop_size`, rescaled and normalised.
    fn preprocess_rgb_labeled(&self, rgb: &RgbImage, label: &str) -> Result<LlavaNextPixels> {
        let image_size = (rgb.height() as usize, rgb.width() as usize);
        let best = select_best_resolution(image_size, &self.image_grid_pinpoints)
            .ok_or_else(|| bad_image(label, "no grid pinpoint fits (empty list or empty image)"))?;
        let tile = self.tile_side();
        if tile == 0 {
            return Err(bad_image(label, "crop_size height is zero"));
        }

        let (new_h, new_w) = patch_output_size(image_size, best);
        let fitted = self.resize_if_needed(rgb, new_h, new_w, label)?;
        let padded = pad_centered(&fitted, best);

        let (base_h, base_w) = self.size.base_view();
        let mut views = vec![self.resize_if_needed(rgb, base_h, base_w, label)?];
        let (rows, cols) = (best.0.div_ceil(tile), best.1.div_ceil(tile));
        for r in 0..rows {
            for c in 0..cols {
                views.push(crop(&padded, r * tile, c * tile, tile, tile));
            }
        }

        let norm = Normalizer::new(
            self.do_rescale,
            self.rescale_factor,
            self.do_normalize,
            self.image_mean,
            self.image_std,
        );
        let mut values = Vec::new();
        let mut view_size = None;
        for view in &views {
            let mut v = view.clone();
            if self.do_resize {
                let (h, w) = self
                    .size
                    .output_size(v.height() as usize, v.width() as usize);
                v = self.resize_if_needed(&v, h, w, label)?;
            }
            if self.do_center_crop {
                v = center_crop(&v, self.crop_size);
            }
            let size = (v.height() as usize, v.width() as usize);
            if *view_size.get_or_insert(size) != size {
                return Err(bad_image(
                    label,
                    "views differ in size (do_center_crop is off and the tiles are uneven)",
                ));
            }
            push_planar(&v, &norm, &mut values);
        }
        Ok(LlavaNextPixels {
            values,
            n_tiles: views.len(),
            tile_size: view_size.unwrap_or((0, 0)),
            image_size,
            best_resolution: best,
            grid: (rows, cols),
        })
    }

    fn resize_if_needed(
        &self,
        image: &RgbImage,
        height: usize,
        width: usize,
        label: &str,
    ) -> Result<RgbImage> {
        if (image.height() as usize, image.width() as usize) == (height, width) {
            Ok(image.clone())
        } else {
            resize_labeled(image, height, width, self.backend, label)
        }
    }
}

fn parse_pinpoints(s: &Section<'_>, key: &str, v: &Value) -> Result<Vec<(usize, usize)>> {
    let bad = || {
        s.bad(
            key,
            format!("expected a list of [height, width] pairs, got {v}"),
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    let pairs = list
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                (Some(h), Some(w)) if h > 0 && w > 0 => Some((h as usize, w as usize)),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    if pairs.is_empty() {
        return Err(s.bad(key, "empty list"));
    }
    Ok(pairs)
}

/// transformers' `get_patch_output_size`: the size of an image of `(height, width)` scaled to
/// fit `target`, the tighter side exactly, the other `min(ceil(side * scale), target)`.
fn patch_output_size(image_size: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (image_size.0 as f64, image_size.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as usize).min(tw))
    }
}

/// `_pad_for_patching`: zero padding to `target`, `divmod(spare, 2)` before and the rest
/// after, on each axis.
fn pad_centered(image: &RgbImage, target: (usize, usize)) -> RgbImage {
    let (h, w) = (image.height() as usize, image.width() as usize);
    let (th, tw) = (target.0.max(h), target.1.max(w));
    let (top, left) = ((th - h) / 2, (tw - w) / 2);
    let mut out = vec![0u8; th * tw * 3];
    let src = image.as_raw();
    for y in 0..h {
        let dst = ((top + y) * tw + left) * 3;
        out[dst..dst + w * 3].copy_from_slice(&src[y * w * 3..(y + 1) * w * 3]);
    }
    rgb_from(tw, th, out)
}

/// The part of `image` at `(top, left)` of at most `height` x `width` (tensor slicing
/// semantics: clipped at the borders).
fn crop(image: &RgbImage, top: usize, left: usize, height: usize, width: usize) -> RgbImage {
    let (h, w) = (image.height() as usize, image.width() as usize);
    let (bottom, right) = ((top + height).min(h), (left + width).min(w));
    let (ch, cw) = (bottom.saturating_sub(top), right.saturating_sub(left));
    let src = image.as_raw();
    let mut out = Vec::with_capacity(ch * cw * 3);
    for y in top..top + ch {
        out.extend_from_slice(&src[(y * w + left) * 3..(y * w + left + cw) * 3]);
    }
    rgb_from(cw, ch, out)
}

/// The torchvision backend's `center_crop`: zero-pad first if the crop is larger
/// (`(crop - side) // 2` before, the rest after), then cut at
/// `int((side - crop) / 2)` from the top and left.
fn center_crop(image: &RgbImage, size: (usize, usize)) -> RgbImage {
    let (ch, cw) = size;
    let (h, w) = (image.height() as usize, image.width() as usize);
    let padded;
    let image = if ch > h || cw > w {
        let (th, tw) = (ch.max(h), cw.max(w));
        padded = pad_centered(image, (th, tw));
        &padded
    } else {
        image
    };
    let (h, w) = (image.height() as usize, image.width() as usize);
    crop(image, (h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Builds an image from a buffer whose length is `width * height * 3` by construction.
fn rgb_from(width: usize, height: usize, data: Vec<u8>) -> RgbImage {
    let (w, h) = (
        u32::try_from(width).unwrap_or(0),
        u32::try_from(height).unwrap_or(0),
    );
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(0, 0))
}

/// Appends `image` normalised, channel-planar (`[3, H, W]`).
fn push_planar(image: &RgbImage, norm: &Normalizer, out: &mut Vec<f32>) {
    let src = image.as_raw();
    for c in 0..3 {
        out.extend(src.chunks_exact(3).map(|px| norm.apply(px[c], c)));
    }
}

#[cfg(test)]
mod tests {
    //! Reference checks against `../shared/hf/<case>/expected.safetensors` (transformers 5.25 on
    //! PTB-XL record 00004 rendered by ECG-Image-Kit, 2200 x 1700 RGBA) and unit checks.
    //!
    //! Measured (transformers 5.25 reference, this code; one 8-bit level is 1 / (255 * std):
    //! 0.00784 for Qwen3-VL's std 0.5, 0.0142..0.0150 for LLaVA's CLIP std):
    //!
    //! | case | resize | max abs diff | values one level off | beyond one level |
    //! |---|---|---:|---:|---:|
    //! | `qwen3_vl_tiny` (252 x 1536) | [`ResizeBackend::Torchvision`] | 0 (bit-exact) | 0 | 0 |
    //! | `qwen3_vl_tiny` | [`ResizeBackend::Pillow`] | 7.84e-3 (1 level) | 1.72% | 0 |
    //! | `llava_next_tiny` (5 x 3 x 336 x 336) | [`ResizeBackend::Torchvision`] | 0 (bit-exact) | 0 | 0 |
    //! | `llava_next_tiny` | [`ResizeBackend::Pillow`] | 3.00e-2 (2 levels) | 0.43% | 2 values (1e-6) |
    //! | `llava_original_tiny` (same expected tensors) | both | as `llava_next_tiny` | | |
    //!
    //! Pillow's two passes can compound: a one-level difference in the 8-bit intermediate image
    //! becomes two after the second pass's sharpening lobes, hence the two values at two levels.

    use super::*;
    use safetensors::{Dtype, SafeTensors};

    /// `../shared` next to the workspace, or `None` after a loud skip (a failure under CI).
    fn shared() -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
        if dir.is_dir() {
            return Some(dir);
        }
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true but {} is missing", dir.display());
        }
        say(&format!(
            "SKIPPED: {} not found; the preprocessing reference checks need the shared data",
            dir.display()
        ));
        None
    }

    /// A line on stderr past the harness's capture.
    fn say(line: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    struct Case {
        dir: PathBuf,
        image: PathBuf,
        expected: PathBuf,
        atol: f64,
    }

    fn case(shared: &Path, name: &str) -> Case {
        let dir = shared.join("hf").join(name);
        let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let image = shared
            .join("data/ptbxl_subset/records100/00000")
            .join(json["image"].as_str().unwrap());
        // llava_original_tiny points at llava_next_tiny's file ("<relative path> (note)").
        let expected = match json
            .get("expected")
            .and_then(Value::as_str)
            .and_then(|text| text.split_whitespace().next())
        {
            Some(rel) => dir.join(rel),
            None => dir.join("expected.safetensors"),
        };
        let atol = json["tolerance"]["preprocess_atol"].as_f64().unwrap();
        Case {
            dir,
            image,
            expected,
            atol,
        }
    }

    /// One tensor of a safetensors file: shape and values as f64 (f32 or i64 stored).
    fn tensor(path: &Path, key: &str) -> (Vec<usize>, Vec<f64>) {
        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        let values = match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{key}: unexpected dtype {other:?}"),
        };
        (t.shape().to_vec(), values)
    }

    /// How far `got` is from `want`: max |diff|, max diff in 8-bit levels (diff * 255 * std
    /// of the element's channel), and the fractions of values off by at least half a level
    /// (i.e. a different 8-bit pixel) and by more than one and a half levels.
    struct Diff {
        n_beyond_one: usize,
        max_abs: f64,
        max_levels: f64,
        frac_one_level: f64,
        frac_beyond_one: f64,
    }

    fn diff(got: &[f32], want: &[f64], std: [f64; 3], channel: impl Fn(usize) -> usize) -> Diff {
        assert_eq!(got.len(), want.len());
        let (mut max_abs, mut max_levels, mut one, mut beyond) = (0.0f64, 0.0f64, 0usize, 0usize);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let d = (f64::from(g) - w).abs();
            let levels = d * 255.0 * std[channel(i)];
            max_abs = max_abs.max(d);
            max_levels = max_levels.max(levels);
            one += usize::from(levels >= 0.5);
            beyond += usize::from(levels > 1.5);
        }
        let n = got.len() as f64;
        Diff {
            n_beyond_one: beyond,
            max_abs,
            max_levels,
            frac_one_level: one as f64 / n,
            frac_beyond_one: beyond as f64 / n,
        }
    }

    fn report(name: &str, backend: ResizeBackend, d: &Diff) {
        say(&format!(
            "{name} [{backend:?}]: max |diff| {:.3e} ({:.3} levels), {:.4}% values one level off, \
             {:.4}% ({}) beyond one level",
            d.max_abs,
            d.max_levels,
            100.0 * d.frac_one_level,
            100.0 * d.frac_beyond_one,
            d.n_beyond_one
        ));
    }

    /// The default backend must be exact (case.json's `preprocess_atol`, 1e-5; measured 0).
    /// Pillow's resize is allowed what was measured for it: one 8-bit level on under 3% of
    /// the values, two levels on at most 1e-5 of them (one level is 1 / (255 * 0.5) = 0.0078
    /// for Qwen3-VL and at most 1 / (255 * 0.2613) = 0.0150 for LLaVA's CLIP statistics).
    fn check_diff(backend: ResizeBackend, d: &Diff, atol: f64) {
        match backend {
            ResizeBackend::Torchvision => {
                assert!(d.max_abs <= atol, "max |diff| {} > {atol}", d.max_abs);
            }
            ResizeBackend::Pillow => {
                assert!(d.max_levels <= 2.0 + 1e-3, "{} levels", d.max_levels);
                assert!(d.frac_one_level < 0.03, "{}", d.frac_one_level);
                assert!(d.frac_beyond_one <= 1e-5, "{}", d.frac_beyond_one);
            }
        }
    }

    #[test]
    fn qwen3_vl_matches_reference() {
        let Some(shared) = shared() else { return };
        let c = case(&shared, "qwen3_vl_tiny");
        let (shape, want) = tensor(&c.expected, "pixel_values");
        let (_, grid) = tensor(&c.expected, "image_grid_thw");
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pillow] {
            let mut p = QwenImageProcessor::from_dir(&c.dir).unwrap();
            p.backend = backend;
            let out = p.preprocess_path(&c.image).unwrap();
            assert_eq!(vec![out.n_patches, out.patch_dim], shape);
            let g = out.grid_thw.map(|v| v as f64);
            assert_eq!(g.as_slice(), grid.as_slice());
            assert_eq!(out.n_image_tokens(p.merge_size), 63);
            let t = p.temporal_patch_size * p.patch_size * p.patch_size;
            let d = diff(&out.values, &want, p.image_std, |i| (i % out.patch_dim) / t);
            report("qwen3_vl_tiny", backend, &d);
            check_diff(backend, &d, c.atol);
        }
    }

    fn check_llava(name: &str) {
        let Some(shared) = shared() else { return };
        let c = case(&shared, name);
        let (shape, want) = tensor(&c.expected, "pixel_values");
        let (_, sizes) = tensor(&c.expected, "image_sizes");
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pillow] {
            let mut p = LlavaNextImageProcessor::from_dir(&c.dir).unwrap();
            p.backend = backend;
            let out = p.preprocess_path(&c.image).unwrap();
            let (th, tw) = out.tile_size;
            assert_eq!(vec![1, out.n_tiles, 3, th, tw], shape);
            let size = [out.image_size.0 as f64, out.image_size.1 as f64];
            assert_eq!(size.as_slice(), sizes.as_slice());
            assert_eq!(out.grid, (2, 2));
            assert_eq!(p.num_image_tokens(out.image_size, 14), Some(2438));
            let d = diff(&out.values, &want, p.image_std, |i| (i / (th * tw)) % 3);
            report(name, backend, &d);
            check_diff(backend, &d, c.atol);
        }
    }

    #[test]
    fn llava_next_matches_reference() {
        check_llava("llava_next_tiny");
    }

    #[test]
    fn llava_original_layout_matches_reference() {
        check_llava("llava_original_tiny");
    }

    #[test]
    fn both_config_files_agree() {
        let Some(shared) = shared() else { return };
        let q = shared.join("hf/qwen3_vl_tiny");
        let flat = QwenImageProcessor::from_file(&q.join("preprocessor_config.json")).unwrap();
        let nested = QwenImageProcessor::from_file(&q.join("processor_config.json")).unwrap();
        assert_eq!(flat, nested);
        assert_eq!((flat.min_pixels, flat.max_pixels), (16384, 65536));
        assert_eq!(
            (flat.patch_size, flat.merge_size, flat.temporal_patch_size),
            (16, 2, 2)
        );
        let l = shared.join("hf/llava_next_tiny");
        let flat = LlavaNextImageProcessor::from_file(&l.join("preprocessor_config.json")).unwrap();
        let nested = LlavaNextImageProcessor::from_file(&l.join("processor_config.json")).unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.size, SizeSpec::ShortestEdge(336));
        assert_eq!(flat.crop_size, (336, 336));
        assert_eq!(flat.image_grid_pinpoints.len(), 5);
    }

    #[test]
    fn reference_geometry() {
        // 1700 x 2200 with factor 32 and at most 65536 pixels: beta = sqrt(57.07).
        assert_eq!(
            smart_resize(1700, 2200, 32, 16384, 65536).unwrap(),
            (224, 288)
        );
        // Round to multiples, within bounds: unchanged branch; and the upscaling branch.
        assert_eq!(
            smart_resize(1700, 2200, 32, 65536, 16777216).unwrap(),
            (1696, 2208)
        );
        assert_eq!(smart_resize(20, 30, 28, 3136, 1003520).unwrap(), (56, 84));
        assert!(smart_resize(10, 2100, 28, 3136, 1003520).is_err());

        let pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
        assert_eq!(
            select_best_resolution((1700, 2200), &pins),
            Some((672, 672))
        );
        assert_eq!(
            select_best_resolution((300, 1000), &pins),
            Some((336, 1008))
        );
        assert_eq!(select_best_resolution((1, 1), &[]), None);
        assert_eq!(anyres_grid_shape((1700, 2200), &pins, 336), Some((2, 2)));
        // 48 x 48 features; new_h = int(round(1700 * 48 / 2200, 7)) = 37, pad (48 - 37) // 2 = 5.
        let region = unpad_region((1700, 2200), (48, 48));
        assert_eq!(
            region,
            UnpadRegion {
                rows: 38,
                cols: 48,
                row_offset: 5,
                col_offset: 0
            }
        );
        // A tall image trims columns.
        let tall = unpad_region((2200, 1700), (48, 48));
        assert_eq!((tall.rows, tall.cols, tall.col_offset), (48, 38, 5));
        assert_eq!(
            llava_next_num_image_tokens((1700, 2200), &pins, 336, 14),
            Some(2438)
        );
        // A pinpoint-shaped image keeps its whole grid: 576 + 24 * 48 + 24.
        assert_eq!(
            llava_next_num_image_tokens((336, 672), &pins, 336, 14),
            Some(576 + 1152 + 24)
        );
        assert_eq!(patch_output_size((1700, 2200), (672, 672)), (520, 672));
        assert_eq!(int_round7(36.999_999_99), 37);
        assert_eq!(int_round7(36.999_99), 36);
    }

    /// A small case computed with Pillow 13 (`Image.resize((5, 3), BICUBIC)`) and with a
    /// Python model of PyTorch's `int16` path that reproduced the shared reference exactly.
    #[test]
    fn resize_small_cases() {
        let src: Vec<u8> = (0..7 * 14 * 3)
            .map(|i| ((i * 37 + i / 7 + 66) % 256) as u8)
            .collect();
        let img = RgbImage::from_raw(14, 7, src).unwrap();
        let pil = resize_bicubic(&img, 3, 5, ResizeBackend::Pillow).unwrap();
        let tv = resize_bicubic(&img, 3, 5, ResizeBackend::Torchvision).unwrap();
        // The two differ in one value (index 21): 102 from Pillow, 103 from PyTorch.
        let mut want = SMALL_5X3.to_vec();
        assert_eq!(pil.as_raw().as_slice(), want.as_slice());
        want[21] = 103;
        assert_eq!(tv.as_raw().as_slice(), want.as_slice());
        // Same size is the identity; a flat image stays flat when enlarged.
        assert_eq!(
            resize_bicubic(&img, 7, 14, ResizeBackend::Torchvision).unwrap(),
            img
        );
        let flat = RgbImage::from_pixel(7, 5, image::Rgb([200, 13, 77]));
        for backend in [ResizeBackend::Torchvision, ResizeBackend::Pillow] {
            let up = resize_bicubic(&flat, 23, 17, backend).unwrap();
            assert!(up.pixels().all(|p| p.0 == [200, 13, 77]));
        }
        assert!(resize_bicubic(&img, 0, 5, ResizeBackend::Pillow).is_err());
    }

    /// Pillow's 5 x 3 bicubic resize of the 14 x 7 test image above.
    const SMALL_5X3: [u8; 45] = [
        125, 145, 134, 127, 123, 148, 153, 108, 111, 122, 156, 131, 98, 111, 149, 150, 113, 133,
        136, 153, 98, 102, 134, 140, 141, 108, 128, 128, 122, 112, 113, 154, 130, 131, 108, 143,
        151, 122, 109, 114, 134, 135, 129, 97, 137,
    ];

    #[test]
    fn alpha_composites_like_pillow() {
        // Values from Pillow 13's Image.alpha_composite over white.
        assert_eq!(composite_on_white([10, 200, 30], 255), [10, 200, 30]);
        assert_eq!(composite_on_white([10, 200, 30], 0), [255, 255, 255]);
        assert_eq!(composite_on_white([10, 200, 30], 128), ALPHA_128);
    }

    const ALPHA_128: [u8; 3] = [132, 227, 142];

    #[test]
    fn sixteen_bit_like_pillow() {
        // Pillow 13 on 16-bit PNGs of these values: grey clamps, RGB takes the high byte.
        let grey = image::ImageBuffer::from_raw(4, 1, vec![0x12u16, 0xFE, 0x100, 0x1234]).unwrap();
        let rgb = to_rgb(&DynamicImage::ImageLuma16(grey), "grey").unwrap();
        assert_eq!(
            rgb.as_raw().as_slice(),
            &[18, 18, 18, 254, 254, 254, 255, 255, 255, 255, 255, 255]
        );
        let colour = image::ImageBuffer::from_raw(1, 1, vec![0x1234u16, 0xABFF, 0x00FF]).unwrap();
        let rgb = to_rgb(&DynamicImage::ImageRgb16(colour), "rgb").unwrap();
        assert_eq!(rgb.as_raw().as_slice(), &[18, 171, 0]);
        let float = DynamicImage::ImageRgb32F(image::ImageBuffer::new(1, 1));
        assert!(matches!(to_rgb(&float, "f"), Err(Error::BadImage { .. })));
    }

    /// A scratch path in the temporary folder, unique to this test process.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("evl-hf-preprocess-{}-{name}", std::process::id()))
    }

    #[test]
    fn not_an_image_names_the_file() {
        let path = scratch("not-an-image.png");
        std::fs::write(&path, "this is text, not a PNG").unwrap();
        let q = QwenImageProcessor {
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_convert_rgb: true,
            min_pixels: 16384,
            max_pixels: 65536,
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            backend: ResizeBackend::Torchvision,
        };
        let err = q.preprocess_path(&path).unwrap_err();
        assert!(matches!(err, Error::Image { .. }), "{err}");
        assert!(err.to_string().contains("not-an-image.png"), "{err}");
        let missing = q.preprocess_path(&scratch("absent.png")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let dir = scratch("qwen-missing");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("preprocessor_config.json"),
            r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "size": {"shortest_edge": 16384, "longest_edge": 65536},
                "merge_size": 2, "temporal_patch_size": 2}"#,
        )
        .unwrap();
        let err = QwenImageProcessor::from_dir(&dir).unwrap_err();
        let Error::MissingField { path, field } = &err else {
            panic!("{err}")
        };
        assert_eq!(field, "patch_size");
        assert!(path.ends_with("preprocessor_config.json"));
        assert!(err.to_string().contains("preprocessor_config.json"));

        // Nested form: the dotted path says where.
        std::fs::remove_file(dir.join("preprocessor_config.json")).unwrap();
        std::fs::write(
            dir.join("processor_config.json"),
            r#"{"image_processor": {"image_mean": 0.5, "image_std": 0.5, "size": {},
                "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}}"#,
        )
        .unwrap();
        let err = QwenImageProcessor::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("image_processor.size.shortest_edge"),
            "{err}"
        );
        let l = LlavaNextImageProcessor::from_dir(&dir).unwrap_err();
        assert!(l.to_string().contains("image_processor.size.height"), "{l}");

        let empty = scratch("empty-dir");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            QwenImageProcessor::from_dir(&empty),
            Err(Error::NoConfig { .. })
        ));
        let bad = scratch("bad-json");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("preprocessor_config.json"), "{ nope").unwrap();
        assert!(matches!(
            LlavaNextImageProcessor::from_dir(&bad),
            Err(Error::Json { .. })
        ));
        for d in [&dir, &empty, &bad] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
