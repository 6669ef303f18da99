//! Records -> model inputs: the rendered ECG paper image (grayscale, downsampled to the model's
//! input size, ink = 1) or the resampled 12-lead signal, and tokenized conversation turns and
//! prompts. What training, evaluation and inference all read; training batches are built
//! from these in `evl-train`.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use ecg_io::Record;
use evl_models::vlm::InputKind;

use crate::text::{BOS, EOS, PAD, SEP, TextTokenizer, Turn};
use crate::{Error, Result};

/// One example's encoder inputs, computed once.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Record id.
    pub id: String,
    /// Grayscale page `[height * width]`, ink = 1.0.
    pub image: Vec<f32>,
    /// Signal `[12 * samples]` in mV, lead-major.
    pub signal: Vec<f32>,
    /// Labels (superclasses).
    pub labels: Vec<String>,
    /// Findings (rhythm and specific statements).
    pub findings: Vec<String>,
    /// Conversation turns.
    pub turns: Vec<Turn>,
}

/// Image and signal sizes the models read.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputSpec {
    /// Image height after downsampling.
    pub height: usize,
    /// Image width after downsampling.
    pub width: usize,
    /// Rendering resolution before downsampling, dpi.
    pub dpi: f32,
    /// Draw the red grid (off by default for the small CPU models: at 120x160 pixels the grid
    /// is as dark as the traces).
    pub grid: bool,
    /// Signal rate, Hz.
    pub signal_fs: u32,
    /// Signal samples per lead.
    pub signal_len: usize,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            height: 240,
            width: 320,
            dpi: 80.0,
            grid: false,
            signal_fs: 100,
            signal_len: 1000,
        }
    }
}

/// Render `record` and reduce it to `spec`'s size by area averaging (ink = 1), then
/// standardise the image to zero mean and unit variance.
pub fn image_of(
    renderer: &ecg_render::Renderer,
    record: &Record,
    spec: &InputSpec,
) -> Result<Vec<f32>, ecg_render::Error> {
    let img = renderer.render(record)?;
    Ok(page_to_model(&img, spec))
}

/// Grayscale ink, area-averaged to the model size and standardised per image.
fn page_to_model(img: &image::RgbImage, spec: &InputSpec) -> Vec<f32> {
    let (w0, h0) = img.dimensions();
    let (w0, h0) = (w0 as usize, h0 as usize);
    let mut out = vec![0.0f32; spec.height * spec.width];
    let mut cnt = vec![0u32; spec.height * spec.width];
    for (i, p) in img.pixels().enumerate() {
        let (x, y) = (i % w0, i / w0);
        let (tx, ty) = (x * spec.width / w0, y * spec.height / h0);
        let g = 0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32;
        out[ty * spec.width + tx] += 1.0 - g / 255.0;
        cnt[ty * spec.width + tx] += 1;
    }
    for (o, c) in out.iter_mut().zip(cnt) {
        *o /= c.max(1) as f32;
    }
    // Standardise per image so the thin traces are not drowned by the paper's level.
    let n = out.len() as f32;
    let mean = out.iter().sum::<f32>() / n;
    let sd = (out.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n)
        .sqrt()
        .max(1e-6);
    for o in out.iter_mut() {
        *o = (*o - mean) / sd;
    }
    out
}

/// The 12 standard leads resampled to `spec.signal_fs` and cropped/padded. A record whose
/// rate is not a positive whole number of Hz is an error (resampling is rational).
pub fn signal_of(record: &Record, spec: &InputSpec) -> crate::Result<Vec<f32>> {
    let fs = record.fs.round();
    if fs < 1.0 || (record.fs - fs).abs() > 1e-9 {
        return Err(crate::Error::Config {
            field: "fs",
            what: format!(
                "record `{}`: sampling rate {} Hz is not a positive whole number",
                record.name, record.fs
            ),
        });
    }
    if spec.signal_fs == 0 {
        return Err(crate::Error::Config {
            field: "signal_fs",
            what: "the model's input.json asks for signals at 0 Hz".into(),
        });
    }
    let mut out = Vec::with_capacity(12 * spec.signal_len);
    let resampler = ecg_signal::Resampler::new(fs as u32, spec.signal_fs);
    for l in record.standard_12_mv() {
        let x = match l {
            Some(x) => resampler.apply(&x),
            None => Vec::new(),
        };
        // Cropped or zero-padded to the model's length; a missing value (NaN) reads as 0.
        let start = out.len();
        out.extend(
            x.iter()
                .take(spec.signal_len)
                .map(|&v| if v.is_finite() { v } else { 0.0 }),
        );
        out.resize(start + spec.signal_len, 0.0);
    }
    Ok(out)
}

/// Token ids of `[BOS] prompt [SEP] answer [EOS]` and which positions are answer tokens
/// (answer and EOS), plus the answer tokens' character offsets within the answer.
pub fn encode_turn(tok: &TextTokenizer, turn: &Turn) -> (Vec<i64>, Vec<bool>, Vec<(usize, usize)>) {
    let (p, _) = tok.encode(&turn.prompt);
    let (a, offs) = tok.encode(&turn.answer);
    let mut ids = vec![BOS];
    ids.extend(&p);
    ids.push(SEP);
    let start = ids.len();
    ids.extend(&a);
    ids.push(EOS);
    let mask = (0..ids.len()).map(|i| i >= start).collect();
    (ids, mask, offs)
}

/// Token ids of `[BOS] prompt [SEP]` (generation and verification queries).
pub fn encode_prompt(tok: &TextTokenizer, prompt: &str) -> Vec<i64> {
    let (p, _) = tok.encode(prompt);
    let mut ids = vec![BOS];
    ids.extend(&p);
    ids.push(SEP);
    ids
}

/// Encoder input of samples as `[b, c, n]`.
pub fn pixels(samples: &[&Sample], input: &InputKind, device: &Device) -> Tensor<3> {
    let b = samples.len();
    let mut v = Vec::new();
    for s in samples {
        v.extend(model_input(s, input));
    }
    let shape = match input {
        InputKind::Image { height, width, .. } => [b, 1, height * width],
        InputKind::Signal {
            leads, samples: n, ..
        } => [b, *leads, *n],
    };
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// One sample's encoder input on the host, as the model with `input` reads it.
pub fn model_input(s: &Sample, input: &InputKind) -> Vec<f32> {
    match input {
        InputKind::Image { height, width, .. } => {
            // Samples hold the largest image; a model reading a smaller one gets it by
            // integer-factor area pooling (its own image processor).
            let n = s.image.len();
            let f = ((n / (height * width)) as f64).sqrt().round() as usize;
            if f <= 1 {
                return s.image[..height * width].to_vec();
            }
            let w0 = width * f;
            let mut v = Vec::with_capacity(height * width);
            for y in 0..*height {
                for x in 0..*width {
                    let mut acc = 0.0;
                    for dy in 0..f {
                        for dx in 0..f {
                            acc += s.image[(y * f + dy) * w0 + x * f + dx];
                        }
                    }
                    v.push(acc / (f * f) as f32);
                }
            }
            v
        }
        InputKind::Signal {
            leads, samples: n, ..
        } => s.signal[..leads * n].to_vec(),
    }
}

/// Padded text tensors: ids, padding mask, answer mask, and the host rows.
pub type TextTensors = (
    Tensor<2, Int>,
    Tensor<2, Bool>,
    Tensor<2, Bool>,
    Vec<(Vec<i64>, Vec<bool>)>,
);

/// Pad token rows into tensors.
pub fn text_tensors(rows: Vec<(Vec<i64>, Vec<bool>)>, device: &Device) -> TextTensors {
    let b = rows.len();
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1);
    let mut ids = vec![PAD; b * t];
    let mut pad = vec![true; b * t];
    let mut ans = vec![false; b * t];
    for (i, (r, m)) in rows.iter().enumerate() {
        for (j, (&id, &a)) in r.iter().zip(m).enumerate() {
            ids[i * t + j] = id;
            pad[i * t + j] = false;
            ans[i * t + j] = a;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [b, t]), device),
        Tensor::from_data(TensorData::new(pad, [b, t]), device),
        Tensor::from_data(TensorData::new(ans, [b, t]), device),
        rows,
    )
}

/// A record with its gold labels and findings.
pub use ecg_data::labelled::Labelled;

/// Render and prepare records for the models (in parallel), with conversations over the
/// superclass label space drawn from `seed`.
pub fn samples_from_records(
    records: Vec<Labelled>,
    spec: &InputSpec,
    seed: u64,
) -> Result<Vec<Sample>> {
    use rayon::prelude::*;
    let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: spec.dpi,
        grid: spec.grid,
        ..Default::default()
    })
    .map_err(|e| Error::Data(Box::new(e)))?;
    let sp = crate::text::superclass_space();
    records
        .into_par_iter()
        .enumerate()
        .map(|(i, (rec, labels, findings))| {
            let image = image_of(&renderer, &rec, spec).map_err(|e| Error::Data(Box::new(e)))?;
            let signal = signal_of(&rec, spec)?;
            let turns =
                crate::text::conversations(&labels, &findings, &sp, seed ^ (i as u64 * 7919));
            Ok(Sample {
                id: rec.name.clone(),
                image,
                signal,
                labels,
                findings,
                turns,
            })
        })
        .collect()
}

/// A model image from an image file (PNG/JPEG of ECG paper, as ECGInstruct ships): grayscale,
/// ink = 1, area-averaged to `spec` and standardised exactly as rendered pages are.
pub fn image_file(path: &std::path::Path, spec: &InputSpec) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    image_bytes(&path.display().to_string(), &bytes, spec)
}

/// [`image_file`] for an encoded image in memory (`name` names it in errors), decoded by
/// [`ecg_render::decode_image`] (format from the bytes, bounded size and allocation).
pub fn image_bytes(name: &str, bytes: &[u8], spec: &InputSpec) -> Result<Vec<f32>> {
    let img = ecg_render::decode_image(name, bytes).map_err(|e| Error::Config {
        field: "image",
        what: e.to_string(),
    })?;
    Ok(page_to_model(&img, spec))
}

/// The items of an ECGInstruct-style conversation file with each one's image file under
/// `image_root` (a path missing there is looked up by its file name anywhere below the root).
///
/// # Errors
/// An unreadable file, an item without an image or whose image is not found, named.
pub fn conversation_images(
    path: &std::path::Path,
    image_root: &std::path::Path,
) -> Result<Vec<(ecg_io::conversation::ConversationItem, std::path::PathBuf)>> {
    let items =
        ecg_io::conversation::read_conversations(path).map_err(|e| Error::Data(Box::new(e)))?;
    let mut by_name: Option<std::collections::HashMap<String, std::path::PathBuf>> = None;
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let rel = it.image.as_deref().ok_or_else(|| Error::Config {
            field: "image",
            what: format!("{}: item `{}` has no image", path.display(), it.id),
        })?;
        let direct = image_root.join(rel);
        let img_path = if direct.is_file() {
            direct
        } else {
            let index = by_name.get_or_insert_with(|| {
                let mut m = std::collections::HashMap::new();
                for ext in ["png", "jpg", "jpeg"] {
                    for p in ecg_data::walk(image_root, ext) {
                        if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                            m.entry(n.to_string()).or_insert(p.clone());
                        }
                    }
                }
                m
            });
            let name = std::path::Path::new(rel)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(rel);
            index.get(name).cloned().ok_or_else(|| Error::Config {
                field: "image",
                what: format!(
                    "{}: item `{}`: image `{rel}` not found under {}",
                    path.display(),
                    it.id,
                    image_root.display()
                ),
            })?
        };
        out.push((it, img_path));
    }
    Ok(out)
}

/// ECGInstruct-style conversations with images under `image_root` as training samples: each
/// item's (user, assistant) exchanges become its turns (`<image>` placeholders dropped). An
/// image path that does not exist under the root is looked up by its file name anywhere below
/// the root. The raw signal is read from a WFDB record beside the image when there is one
/// (PTB-XL's `<record>-0.png` next to `<record>.hea`); without it, signal input is empty and
/// signal models refuse the item by name.
pub fn conversation_samples(
    path: &std::path::Path,
    image_root: &std::path::Path,
    spec: &InputSpec,
) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (it, img_path) in conversation_images(path, image_root)? {
        let image = image_file(&img_path, spec)?;
        // `<record>-<k>.png` beside `<record>.hea`.
        let stem = img_path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let record = stem.rsplit_once('-').map_or(stem, |(a, _)| a);
        let hea = img_path.with_file_name(format!("{record}.hea"));
        let signal = if hea.is_file() {
            let rec = ecg_io::read_record(&hea, ecg_io::ReadOptions::default())
                .map_err(|e| Error::Data(Box::new(e)))?;
            signal_of(&rec, spec)?
        } else {
            Vec::new()
        };
        let turns: Vec<Turn> = it
            .exchanges()
            .into_iter()
            .map(|(q, a)| Turn {
                prompt: q.replace("<image>", "").trim().to_string(),
                answer: a.trim().to_string(),
                template: "conversation".into(),
            })
            .collect();
        if turns.is_empty() {
            return Err(Error::Config {
                field: "conversations",
                what: format!(
                    "{}: item `{}` has no user/assistant exchange",
                    path.display(),
                    it.id
                ),
            });
        }
        out.push(Sample {
            id: it.id.clone(),
            image,
            signal,
            labels: Vec::new(),
            findings: Vec::new(),
            turns,
        });
    }
    Ok(out)
}

/// Every sample carries what a model with `input` reads (signal models need a signal; an
/// image-only conversation item has none), else an error naming the first that does not.
pub fn check_inputs(samples: &[Sample], input: &InputKind) -> Result<()> {
    let need = match input {
        InputKind::Signal { leads, samples, .. } => (leads * samples, "signal"),
        InputKind::Image { .. } => (0, "image"),
    };
    if let Some(s) = samples.iter().find(|s| match input {
        InputKind::Signal { .. } => s.signal.len() < need.0,
        InputKind::Image { height, width, .. } => s.image.len() < height * width,
    }) {
        return Err(Error::Config {
            field: "input",
            what: format!(
                "sample `{}` has no {} input for this model (an image-only conversation item \
                 cannot train a signal model; use an image model or records with signals)",
                s.id, need.1
            ),
        });
    }
    Ok(())
}

/// Every prompt and answer of `samples`' conversations: what tokenizers are trained on.
pub fn corpus(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .flat_map(|s| {
            s.turns
                .iter()
                .flat_map(|t| [t.prompt.clone(), t.answer.clone()])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose input.json asks for 0 Hz is refused by name, not a panic in the
    /// resampler.
    #[test]
    fn a_zero_signal_rate_is_named() {
        let e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 1, 0);
        let spec = InputSpec {
            signal_fs: 0,
            ..InputSpec::default()
        };
        let err = signal_of(&e.record, &spec).unwrap_err().to_string();
        assert!(err.contains("signal_fs"), "{err}");
        assert_eq!(
            signal_of(&e.record, &InputSpec::default()).unwrap().len(),
            12 * InputSpec::default().signal_len
        );
    }
}
