//! An on-disk cache of preprocessed signals: one safetensors file per (dataset, preprocess)
//! with tensors `signals` `[n, leads, len]` (f32), `labels` `[n, classes]` (f32),
//! `lead_mask` `[n, leads]` (u8), and the entry ids and settings in the metadata. Written
//! atomically; a cache whose settings or ids differ from the request is rebuilt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use crate::{Dataset, Error, Example, Preprocess, Result};

/// Preprocessed signals of a dataset, in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalCache {
    /// Entry ids, in dataset order.
    pub ids: Vec<String>,
    /// Leads per example.
    pub n_leads: usize,
    /// Samples per lead.
    pub len: usize,
    /// Classes per label vector.
    pub n_classes: usize,
    /// `[n, leads, len]` flattened.
    pub signals: Vec<f32>,
    /// `[n, classes]` flattened.
    pub labels: Vec<f32>,
    /// `[n, leads]` flattened.
    pub lead_mask: Vec<bool>,
}

fn cache_err(path: &Path, what: impl Into<String>) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl SignalCache {
    /// Build from a dataset (every entry, in parallel).
    pub fn build(ds: &Dataset, p: &Preprocess) -> Result<SignalCache> {
        let idx: Vec<usize> = (0..ds.entries.len()).collect();
        let ex = ds.load_many(&idx, p)?;
        Ok(SignalCache::from_examples(ds, p, &ex))
    }

    fn from_examples(ds: &Dataset, p: &Preprocess, ex: &[Example]) -> SignalCache {
        SignalCache {
            ids: ds.entries.iter().map(|e| e.id.clone()).collect(),
            n_leads: p.leads.len(),
            len: p.len,
            n_classes: ds.space.labels.len(),
            signals: ex.iter().flat_map(|e| e.signal.iter().copied()).collect(),
            labels: ex.iter().flat_map(|e| e.labels.iter().copied()).collect(),
            lead_mask: ex
                .iter()
                .flat_map(|e| e.lead_mask.iter().copied())
                .collect(),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Signal of example `i` (`[leads * len]`).
    pub fn signal(&self, i: usize) -> &[f32] {
        let s = self.n_leads * self.len;
        &self.signals[i * s..(i + 1) * s]
    }

    /// Labels of example `i`.
    pub fn label(&self, i: usize) -> &[f32] {
        &self.labels[i * self.n_classes..(i + 1) * self.n_classes]
    }

    /// Write to `path` (atomic).
    pub fn save(&self, path: &Path, p: &Preprocess) -> Result<()> {
        let n = self.len();
        let sig = f32_bytes(&self.signals);
        let lab = f32_bytes(&self.labels);
        let mask: Vec<u8> = self.lead_mask.iter().map(|&b| b as u8).collect();
        let views = [
            (
                "signals",
                TensorView::new(Dtype::F32, vec![n, self.n_leads, self.len], &sig),
            ),
            (
                "labels",
                TensorView::new(Dtype::F32, vec![n, self.n_classes], &lab),
            ),
            (
                "lead_mask",
                TensorView::new(Dtype::U8, vec![n, self.n_leads], &mask),
            ),
        ];
        let views: Vec<(&str, TensorView)> = views
            .into_iter()
            .map(|(k, v)| {
                v.map(|v| (k, v))
                    .map_err(|e| cache_err(path, e.to_string()))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        meta.insert(
            "ids".to_string(),
            serde_json::to_string(&self.ids).expect("strings"),
        );
        meta.insert(
            "preprocess".to_string(),
            serde_json::to_string(p).expect("plain data"),
        );
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| cache_err(path, e.to_string()))?;
        ecg_io::wfdb::atomic_write(path, &bytes)?;
        Ok(())
    }

    /// Read a cache file; `None` when its settings or ids differ from the request.
    pub fn load(path: &Path, ds: &Dataset, p: &Preprocess) -> Result<Option<SignalCache>> {
        let bytes = std::fs::read(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| cache_err(path, e.to_string()))?;
        let m = meta.metadata().clone().unwrap_or_default();
        let want_p = serde_json::to_string(p).expect("plain data");
        let ids: Vec<String> = serde_json::from_str(m.get("ids").map_or("[]", String::as_str))
            .map_err(|e| cache_err(path, format!("ids: {e}")))?;
        let same_ids =
            ids.len() == ds.entries.len() && ids.iter().zip(&ds.entries).all(|(a, e)| a == &e.id);
        if m.get("preprocess") != Some(&want_p) || !same_ids {
            return Ok(None);
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| cache_err(path, e.to_string()))?;
        let get = |name: &str| {
            st.tensor(name)
                .map_err(|e| cache_err(path, format!("{name}: {e}")))
        };
        let f32s = |t: TensorView| -> Vec<f32> {
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let s = get("signals")?;
        let shape = s.shape().to_vec();
        if shape.len() != 3
            || shape[0] != ids.len()
            || shape[1] != p.leads.len()
            || shape[2] != p.len
        {
            return Err(cache_err(
                path,
                format!("signals shape {shape:?} does not match the settings"),
            ));
        }
        let l = get("labels")?;
        let n_classes = l.shape().get(1).copied().unwrap_or(0);
        Ok(Some(SignalCache {
            ids,
            n_leads: shape[1],
            len: shape[2],
            n_classes,
            signals: f32s(s),
            labels: f32s(l),
            lead_mask: get("lead_mask")?.data().iter().map(|&b| b != 0).collect(),
        }))
    }

    /// Load `dir/<name>-<preprocess key>.safetensors` if valid, else build and save it.
    pub fn open_or_build(
        dir: &Path,
        name: &str,
        ds: &Dataset,
        p: &Preprocess,
    ) -> Result<(SignalCache, PathBuf, bool)> {
        let path = dir.join(format!("{name}-{}.safetensors", p.key()));
        if path.exists()
            && let Some(c) = SignalCache::load(&path, ds, p)?
        {
            return Ok((c, path, true));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let c = SignalCache::build(ds, p)?;
        c.save(&path, p)?;
        Ok((c, path, false))
    }
}
