//! Parity of the real model families with Hugging Face transformers.
//!
//! Every case folder under `$EVL_HF_DIR` (default `../shared/hf`) is loaded as a user would
//! load a checkpoint (config.json + safetensors), run from the stored `pixel_values` and
//! `input_ids`, and every tensor of its `expected.safetensors` is compared within the
//! tolerances of its `case.json`; greedy generations must match exactly. Nothing here knows
//! the tiny sizes: other widths, depths, GQA ratios, image sizes and DeepStack layers run the
//! same way (`EVL_HF_DIR=<dir> cargo test --release --test hf_parity`).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use burn::tensor::{DType, Device, Tensor, TensorData};
use evl_hf::HfConfig;
use evl_hf::weights::{Checkpoint, Reference, read_all_f64};
use evl_models::device::to_vec_f64;
use evl_models::hf::decoder::KvCache;
use evl_models::hf::io::Loader;
use evl_models::hf::llava_next::{LlavaImage, LlavaNext};
use evl_models::hf::qwen3_vl::{Qwen3Vl, QwenImage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn hf_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EVL_HF_DIR") {
        return Some(PathBuf::from(d));
    }
    evl_testkit::shared_dir().map(|d| d.join("hf"))
}

struct Case {
    dir: PathBuf,
    case: serde_json::Value,
    expected: BTreeMap<String, Reference>,
}

impl Case {
    fn tol(&self, key: &str) -> f64 {
        self.case["tolerance"][key].as_f64().unwrap()
    }

    fn get(&self, key: &str) -> &Reference {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("{}: expected tensor `{key}` is absent", self.dir.display()))
    }

    fn ids(&self, key: &str) -> Vec<i64> {
        self.get(key).1.iter().map(|&v| v as i64).collect()
    }

    /// Compares `ours` with the reference `key` (shape and values), returning the largest
    /// absolute difference; panics with the worst position when out of tolerance.
    fn check(&self, key: &str, ours: &[f64], shape: &[usize], atol: f64, rtol: f64) -> f64 {
        let (eshape, exp) = self.get(key);
        assert_eq!(
            eshape.as_slice(),
            shape,
            "{}: `{key}` shape",
            self.dir.display()
        );
        let mut worst = (0.0f64, 0usize, 0.0f64);
        for (i, (a, b)) in ours.iter().zip(exp).enumerate() {
            let d = (a - b).abs();
            let excess = d - (atol + rtol * b.abs());
            if excess > worst.2 || (i == 0 && excess > 0.0) {
                worst = (d, i, excess);
            }
            if d > worst.0 && excess <= 0.0 && worst.2 <= 0.0 {
                worst = (d, i, excess);
            }
        }
        let max = ours
            .iter()
            .zip(exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst.2 <= 0.0,
            "{}: `{key}` differs at flat index {}: ours {} vs transformers {} (|diff| {}, atol {atol}, rtol {rtol})",
            self.dir.display(),
            worst.1,
            ours[worst.1],
            exp[worst.1],
            worst.0
        );
        max
    }
}

fn cases() -> Vec<Case> {
    let Some(root) = hf_dir() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let expected_path = case["expected"]
            .as_str()
            .map(|s| dir.join(s.split_whitespace().next().unwrap()))
            .unwrap_or_else(|| dir.join("expected.safetensors"));
        let expected = read_all_f64(&expected_path).unwrap();
        out.push(Case {
            dir,
            case,
            expected,
        });
    }
    assert!(!out.is_empty(), "{}: no case folders", root.display());
    out
}

fn tensor2(values: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), (device, DType::F32))
}

fn flat<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    to_vec_f64(t)
}

fn qwen3_vl(c: &Case, cfg: &evl_hf::config::Qwen3VlConfig) {
    let device = Device::flex();
    let mut ckpt = Checkpoint::open(&c.dir).unwrap();
    let model = Qwen3Vl::load(&mut Loader::new(&mut ckpt, &device), cfg).unwrap();
    ckpt.finish().unwrap();
    let (hat, hrt, lat) = (
        c.tol("hidden_atol"),
        c.tol("hidden_rtol"),
        c.tol("logits_atol"),
    );
    let (pshape, pixels) = c.get("pixel_values");
    let grid: Vec<usize> = c
        .get("image_grid_thw")
        .1
        .iter()
        .map(|&v| v as usize)
        .collect();
    let image = QwenImage {
        pixels: tensor2(pixels, [pshape[0], pshape[1]], &device),
        grid: [grid[0], grid[1], grid[2]],
    };
    let merge = cfg.vision.spatial_merge_size;
    user_inputs(c, grid.iter().product::<usize>() / (merge * merge));
    let ids = c.ids("input_ids");
    let s = ids.len();
    let d = cfg.text.hidden_size;
    let mut cache = KvCache::default();
    let out = model
        .forward(
            std::slice::from_ref(&ids),
            &[Some(image.clone())],
            &mut cache,
            true,
        )
        .unwrap();
    // Positions.
    let pos: Vec<f64> = out.positions[0]
        .iter()
        .flatten()
        .map(|&v| v as f64)
        .collect();
    c.check("position_ids", &pos, &[3, s], 0.0, 0.0);
    // Vision.
    let v = &out.vision[0];
    c.check(
        "vision_last_hidden",
        &flat(v.last_hidden.clone()),
        &v.last_hidden.dims(),
        hat,
        hrt,
    );
    c.check(
        "image_embeds",
        &flat(v.embeds.clone()),
        &v.embeds.dims(),
        hat,
        hrt,
    );
    for (k, f) in v.deepstack.iter().enumerate() {
        c.check(
            &format!("deepstack.{k}"),
            &flat(f.clone()),
            &f.dims(),
            hat,
            hrt,
        );
    }
    // Decoder hidden states.
    assert_eq!(out.hidden.len(), cfg.text.num_layers + 1);
    for (i, h) in out.hidden.iter().enumerate() {
        let m = c.check(
            &format!("hidden_states.{i}"),
            &flat(h.clone()),
            &[s, d],
            hat,
            hrt,
        );
        eprintln!("{}: hidden_states.{i} max |diff| {m:.2e}", c.dir.display());
    }
    logits_checks(c, model.text().logits(out.last.clone()), s, lat);
    // Greedy generation (12 tokens with EOS suppressed, as min_new_tokens=12).
    let want = c.ids("generated_ids");
    let eos = eos_ids(&c.dir);
    let got = model
        .generate(&ids, Some(image), want.len(), want.len(), &eos)
        .unwrap();
    assert_eq!(got, want, "{}: generated ids", c.dir.display());
}

fn eos_ids(dir: &Path) -> Vec<i64> {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    match &g["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().map(|v| v.as_i64().unwrap()).collect(),
        v => v.as_i64().into_iter().collect(),
    }
}

fn logits_checks(c: &Case, logits: Tensor<3>, s: usize, lat: f64) {
    let vocab = logits.dims()[2];
    let logits = logits.reshape([s, vocab]);
    let k = c.get("logits_last").0[0];
    let last = logits.clone().slice([s - k..s, 0..vocab]);
    let m = c.check("logits_last", &flat(last), &[k, vocab], lat, 0.0);
    eprintln!("{}: logits_last max |diff| {m:.2e}", c.dir.display());
    let lse = flat(evl_models::ops::logsumexp(logits.clone(), 1).reshape([s]));
    c.check("logsumexp_all", &lse, &[s], lat, 0.0);
    let arg: Vec<f64> = evl_models::device::to_vec_f64(logits.argmax(1).reshape([s]).float());
    c.check("argmax_all", &arg, &[s], 0.0, 0.0);
}

/// The case's PTB-XL image, where the case's data folder is beside the checkpoints
/// (`<hf>/../data/ptbxl_subset/records100/00000/`) or in the case folder itself.
fn image_path(c: &Case) -> Option<PathBuf> {
    let name = c.case["image"].as_str()?;
    let root = c.dir.parent()?;
    [
        root.join("../data/ptbxl_subset/records100/00000")
            .join(name),
        c.dir.join(name),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The user's path in front of the model: the prompt string through the checkpoint's
/// tokenizer and chat format, the PNG through its image processor, against the stored
/// processor outputs.
fn user_inputs(c: &Case, image_tokens: usize) {
    let prompter = evl_hf::prompt::Prompter::from_dir(&c.dir).unwrap();
    let prompt = c.case["prompt"].as_str().unwrap();
    let t = prompter.tokenize_prompt(prompt, &[image_tokens]).unwrap();
    let ids: Vec<f64> = t.input_ids.iter().map(|&v| f64::from(v)).collect();
    c.check("input_ids", &ids, &[1, ids.len()], 0.0, 0.0);
    let mask: Vec<f64> = t.attention_mask.iter().map(|&v| f64::from(v)).collect();
    c.check("attention_mask", &mask, &[1, ids.len()], 0.0, 0.0);
    if c.expected.contains_key("mm_token_type_ids") {
        let tt: Vec<f64> = t.mm_token_type_ids.iter().map(|&v| f64::from(v)).collect();
        c.check("mm_token_type_ids", &tt, &[1, ids.len()], 0.0, 0.0);
    }
    let Some(png) = image_path(c) else {
        eprintln!(
            "NOTE {}: the case image is not beside it; preprocessing not compared",
            c.dir.display()
        );
        return;
    };
    let atol = c.tol("preprocess_atol");
    match HfConfig::from_dir(&c.dir).unwrap() {
        HfConfig::Qwen3Vl(_) => {
            let p = evl_hf::preprocess::QwenImageProcessor::from_dir(&c.dir)
                .unwrap()
                .preprocess_path(&png)
                .unwrap();
            let v: Vec<f64> = p.values.iter().map(|&x| f64::from(x)).collect();
            let m = c.check("pixel_values", &v, &[p.n_patches, p.patch_dim], atol, 0.0);
            eprintln!("{}: pixel_values max |diff| {m:.2e}", c.dir.display());
            let g: Vec<f64> = p.grid_thw.iter().map(|&x| x as f64).collect();
            c.check("image_grid_thw", &g, &[1, 3], 0.0, 0.0);
        }
        HfConfig::LlavaNext(_) => {
            let p = evl_hf::preprocess::LlavaNextImageProcessor::from_dir(&c.dir)
                .unwrap()
                .preprocess_path(&png)
                .unwrap();
            let v: Vec<f64> = p.values.iter().map(|&x| f64::from(x)).collect();
            let (th, tw) = p.tile_size;
            let m = c.check("pixel_values", &v, &[1, p.n_tiles, 3, th, tw], atol, 0.0);
            eprintln!("{}: pixel_values max |diff| {m:.2e}", c.dir.display());
            let sz = [p.image_size.0 as f64, p.image_size.1 as f64];
            c.check("image_sizes", &sz, &[1, 2], 0.0, 0.0);
        }
    }
}

fn llava_next(c: &Case, cfg: &evl_hf::config::LlavaNextConfig) {
    let device = Device::flex();
    let mut ckpt = Checkpoint::open(&c.dir).unwrap();
    let model = LlavaNext::load(&mut Loader::new(&mut ckpt, &device), cfg).unwrap();
    ckpt.finish().unwrap();
    let (hat, hrt, lat) = (
        c.tol("hidden_atol"),
        c.tol("hidden_rtol"),
        c.tol("logits_atol"),
    );
    let (pshape, pixels) = c.get("pixel_values");
    let v: Vec<f32> = pixels.iter().map(|&x| x as f32).collect();
    let tiles = Tensor::<4>::from_data(
        TensorData::new(v, [pshape[1], pshape[2], pshape[3], pshape[4]]),
        (&device, DType::F32),
    );
    let size = c.get("image_sizes").1.clone();
    let image = LlavaImage {
        tiles,
        size: (size[0] as usize, size[1] as usize),
    };
    let n_img = model.image_tokens(image.size).unwrap();
    assert_eq!(n_img as u64, c.case["image_tokens"].as_u64().unwrap());
    user_inputs(c, n_img);
    let ids = c.ids("input_ids");
    let s = ids.len();
    let d = cfg.text.hidden_size;
    let mut cache = KvCache::default();
    let out = model
        .forward(
            std::slice::from_ref(&ids),
            &[Some(image.clone())],
            &mut cache,
            true,
        )
        .unwrap();
    let e = &out.image_embeds[0];
    let m = c.check("image_embeds", &flat(e.clone()), &e.dims(), hat, hrt);
    eprintln!("{}: image_embeds max |diff| {m:.2e}", c.dir.display());
    assert_eq!(out.hidden.len(), cfg.text.num_layers + 1);
    for (i, h) in out.hidden.iter().enumerate() {
        let m = c.check(
            &format!("hidden_states.{i}"),
            &flat(h.clone()),
            &[s, d],
            hat,
            hrt,
        );
        eprintln!("{}: hidden_states.{i} max |diff| {m:.2e}", c.dir.display());
    }
    logits_checks(c, model.text().logits(out.last.clone()), s, lat);
    let want = c.ids("generated_ids");
    let got = model
        .generate(&ids, Some(image), want.len(), want.len(), &eos_ids(&c.dir))
        .unwrap();
    assert_eq!(got, want, "{}: generated ids", c.dir.display());
}

#[test]
fn every_case_matches_transformers() {
    let cases = cases();
    let mut ran = 0;
    for c in &cases {
        match HfConfig::from_dir(&c.dir).unwrap() {
            HfConfig::Qwen3Vl(cfg) => qwen3_vl(c, &cfg),
            HfConfig::LlavaNext(cfg) => llava_next(c, &cfg),
        }
        ran += 1;
    }
    if !cases.is_empty() {
        assert_eq!(ran, cases.len());
    }
}
