//! A checkpoint's tensors: `model.safetensors`, or the shards a `model.safetensors.index.json`
//! maps names to, in bf16, f16 or f32, handed out widened to f32 (bf16 and f16 widen
//! exactly).
//!
//! The model builder takes every tensor it needs by name and expected shape; [`Checkpoint::finish`]
//! then refuses any tensor nobody took. So a checkpoint of another size, a renamed layer or a
//! missing shard is an error naming the tensor and the file, never a silently random or
//! silently ignored parameter. A shard is read when its first tensor is taken and dropped when
//! its last one has been, so a 7B checkpoint never sits in memory twice.

use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Errors reading or writing checkpoint tensors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither `model.safetensors` nor `model.safetensors.index.json` is in the folder.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// Folder.
        dir: PathBuf,
    },
    /// A file is not valid safetensors (truncated, corrupt header) or a bad index.
    #[error("{path}: {what}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    Missing {
        /// Tensor name.
        name: String,
        /// The checkpoint (file or index).
        path: PathBuf,
    },
    /// A tensor has another shape than the configuration implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, the configuration implies {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// File.
        path: PathBuf,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// A tensor of a dtype that is not a float weight.
    #[error("{path}: tensor `{name}` is {dtype}, expected bf16, f16 or f32")]
    Dtype {
        /// Tensor name.
        name: String,
        /// File.
        path: PathBuf,
        /// What the file holds.
        dtype: String,
    },
    /// Tensors the model does not use: another architecture or size, or a naming evl-ecg does
    /// not map.
    #[error("{path}: {count} tensor(s) the model does not use, e.g. {examples}")]
    Unexpected {
        /// The checkpoint (file or index).
        path: PathBuf,
        /// How many.
        count: usize,
        /// The first few names.
        examples: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// A tensor on the host, row-major, widened to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// Storage precision of a checkpoint's float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// bfloat16 (released checkpoints).
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl WeightDtype {
    fn of(d: Dtype) -> Option<Self> {
        match d {
            Dtype::BF16 => Some(WeightDtype::Bf16),
            Dtype::F16 => Some(WeightDtype::F16),
            Dtype::F32 => Some(WeightDtype::F32),
            _ => None,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            WeightDtype::Bf16 => Dtype::BF16,
            WeightDtype::F16 => Dtype::F16,
            WeightDtype::F32 => Dtype::F32,
        }
    }
}

struct Shard {
    path: PathBuf,
    /// The file's bytes and parsed header while any of its tensors is still to be taken.
    loaded: Option<(Vec<u8>, usize, Metadata)>,
    remaining: BTreeSet<String>,
}

/// An open checkpoint; see the module docs.
pub struct Checkpoint {
    /// `model.safetensors` or the index file (for messages).
    origin: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> shard.
    where_: BTreeMap<String, usize>,
    dtype: Option<WeightDtype>,
    /// A synthetic checkpoint's generator state (see [`Checkpoint::synthetic`]).
    synthetic: Option<u64>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn header(path: &Path, bytes: &[u8]) -> Result<(usize, Metadata)> {
    SafeTensors::read_metadata(bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        what: format!("not a valid safetensors file ({e})"),
    })
}

/// The weight files of a checkpoint folder, in a fixed order, with the file that names them
/// (for messages): `model.safetensors` alone, or the shards a
/// `model.safetensors.index.json` names (each once, in name order). Nothing is opened but
/// the index.
///
/// # Errors
/// No weights file; an unreadable index, or one without a `weight_map` of file names.
pub fn weight_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok((single.clone(), vec![single]));
    }
    if !index.is_file() {
        return Err(Error::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
        path: index.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: index.clone(),
        what: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Format {
            path: index.clone(),
            what: "no `weight_map` object".into(),
        })?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Format {
            path: index.clone(),
            what: format!("weight_map entry `{name}` is not a file name"),
        })?;
        files.insert(file.to_string());
    }
    let files = files.into_iter().map(|f| dir.join(f)).collect();
    Ok((index, files))
}

impl Checkpoint {
    /// Opens the weights of a checkpoint folder.
    ///
    /// # Errors
    /// No weights file, an unreadable or malformed index or shard (checked here, header and
    /// length, for every shard), a shard the index names that is absent.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let (origin, files) = weight_files(dir)?;
        let mut shards = Vec::new();
        let mut where_ = BTreeMap::new();
        let mut dtype = None;
        for path in files {
            if !path.is_file() {
                return Err(Error::Io {
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("shard named by {} is absent", origin.display()),
                    ),
                    path,
                });
            }
            // The header is read (and the length checked against it) now, so a truncated
            // shard fails at open rather than halfway through building a model.
            let bytes = read(&path)?;
            let (n, meta) = header(&path, &bytes)?;
            let mut remaining = BTreeSet::new();
            for (name, info) in meta.tensors() {
                if dtype.is_none() {
                    dtype = WeightDtype::of(info.dtype);
                }
                remaining.insert(name.clone());
                if let Some(other) = where_.insert(name.clone(), shards.len()) {
                    let other: &Shard = &shards[other];
                    return Err(Error::Format {
                        path: path.clone(),
                        what: format!("tensor `{name}` is also in {}", other.path.display()),
                    });
                }
            }
            shards.push(Shard {
                path,
                loaded: Some((bytes, n, meta)),
                remaining,
            });
            // Only the first shard is kept in memory from here; the others are read again
            // when needed.
            if shards.len() > 1
                && let Some(s) = shards.last_mut()
            {
                s.loaded = None;
            }
        }
        Ok(Checkpoint {
            origin,
            shards,
            where_,
            dtype,
            synthetic: None,
        })
    }

    /// A checkpoint that holds every tensor asked for, freshly initialised: norm weights 1,
    /// biases 0, everything else N(0, 0.02) from `seed`. For building a model of any size
    /// from a `config.json` alone (benchmarks at sizes nobody published); a model built from
    /// it is random, and says nothing about a trained one.
    pub fn synthetic(seed: u64) -> Checkpoint {
        Checkpoint {
            origin: PathBuf::from("<synthetic>"),
            shards: Vec::new(),
            where_: BTreeMap::new(),
            dtype: None,
            synthetic: Some(seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// The next standard normal draw of a synthetic checkpoint (SplitMix64 + Box-Muller:
    /// benchmark weights need no statistical quality a dependency would add).
    fn normal(state: &mut u64) -> f32 {
        let mut next = || {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// The checkpoint's main file (`model.safetensors` or the index).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The storage dtype of its float tensors (of the first one seen).
    pub fn dtype(&self) -> Option<WeightDtype> {
        self.dtype
    }

    /// Whether the checkpoint holds a tensor of this name (taken or not).
    pub fn contains(&self, name: &str) -> bool {
        self.synthetic.is_some() || self.where_.contains_key(name)
    }

    /// Takes one tensor, checking its shape.
    ///
    /// # Errors
    /// [`Error::Missing`], [`Error::Shape`], [`Error::Dtype`], or a shard that became
    /// unreadable.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        if let Some(state) = &mut self.synthetic {
            let n: usize = shape.iter().product();
            let data = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 1 && name.contains("norm") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| 0.02 * Self::normal(state)).collect()
            };
            return Ok(HostTensor {
                shape: shape.to_vec(),
                data,
            });
        }
        let &i = self.where_.get(name).ok_or_else(|| Error::Missing {
            name: name.to_string(),
            path: self.origin.clone(),
        })?;
        let shard = &mut self.shards[i];
        if shard.loaded.is_none() {
            let bytes = read(&shard.path)?;
            let (n, meta) = header(&shard.path, &bytes)?;
            shard.loaded = Some((bytes, n, meta));
        }
        let Some((bytes, n, meta)) = &shard.loaded else {
            unreachable!("loaded above")
        };
        let info = meta.info(name).ok_or_else(|| Error::Missing {
            name: name.to_string(),
            path: shard.path.clone(),
        })?;
        if info.shape != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let raw = bytes
            .get(8 + n + start..8 + n + end)
            .ok_or_else(|| Error::Format {
                path: shard.path.clone(),
                what: format!("tensor `{name}` lies beyond the end of the file (truncated?)"),
            })?;
        let data = widen(raw, info.dtype).ok_or_else(|| Error::Dtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        shard.remaining.remove(name);
        if shard.remaining.is_empty() {
            shard.loaded = None;
        }
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Checks that every tensor was taken.
    ///
    /// # Errors
    /// [`Error::Unexpected`] naming the first few left over.
    pub fn finish(self) -> Result<()> {
        let left: Vec<&String> = self.shards.iter().flat_map(|s| &s.remaining).collect();
        if left.is_empty() {
            return Ok(());
        }
        Err(Error::Unexpected {
            path: self.origin.clone(),
            count: left.len(),
            examples: left
                .iter()
                .take(5)
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Little-endian bytes of one dtype -> f32; `None` for dtypes that are not float weights.
fn widen(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    match dtype {
        Dtype::BF16 => Some(
            raw.chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
        ),
        Dtype::F16 => Some(
            raw.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::F32 => Some(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        _ => None,
    }
}

/// One reference array: shape and values.
pub type Reference = (Vec<usize>, Vec<f64>);

/// Reads a whole safetensors file of reference values (any numeric dtype) as f64 arrays,
/// keyed by name: the parity tests' `expected.safetensors`.
///
/// # Errors
/// Unreadable or malformed file, a non-numeric dtype.
pub fn read_all_f64(path: &Path) -> Result<BTreeMap<String, Reference>> {
    let bytes = read(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        what: format!("not a valid safetensors file ({e})"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|b| f64::from(i32::from_le_bytes(b.try_into().unwrap_or([0; 4]))))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect(),
            d => widen(raw, d)
                .ok_or_else(|| Error::Dtype {
                    name: name.clone(),
                    path: path.to_path_buf(),
                    dtype: format!("{d:?}"),
                })?
                .into_iter()
                .map(f64::from)
                .collect(),
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Writes tensors as one safetensors file in `dtype` (rounded to nearest even for bf16/f16),
/// atomically: a temporary file in the same folder, synced, then renamed over `path`.
///
/// # Errors
/// I/O errors, naming the file.
pub fn save(path: &Path, tensors: &[(String, HostTensor)], dtype: WeightDtype) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = match dtype {
                WeightDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                WeightDtype::Bf16 => t
                    .data
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                WeightDtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Format {
                    path: path.to_path_buf(),
                    what: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("safetensors.partial");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(shape: &[usize], data: &[f32]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn round_trip_missing_unexpected_shape_and_truncation_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors = vec![
            (
                "a.weight".to_string(),
                t(&[2, 2], &[1.0, -2.5, 0.15625, 3.0]),
            ),
            ("b.bias".to_string(), t(&[3], &[0.5, 0.25, -1.0])),
        ];
        for dtype in [WeightDtype::Bf16, WeightDtype::F16, WeightDtype::F32] {
            save(&path, &tensors, dtype).unwrap();
            let mut c = Checkpoint::open(dir.path()).unwrap();
            assert_eq!(c.dtype(), Some(dtype));
            // These values are exact in all three dtypes.
            assert_eq!(c.take("a.weight", &[2, 2]).unwrap(), tensors[0].1);
            let e = c.take("b.bias", &[4]).unwrap_err().to_string();
            assert!(
                e.contains("b.bias") && e.contains("[3]") && e.contains("[4]"),
                "{e}"
            );
            let e = c.take("c.weight", &[1]).unwrap_err().to_string();
            assert!(e.contains("c.weight") && e.contains("missing"), "{e}");
            let e = c.finish().unwrap_err().to_string();
            assert!(e.contains("1 tensor(s)") && e.contains("b.bias"), "{e}");
        }
        // bf16 rounds to nearest even and widens exactly.
        save(
            &path,
            &[("x".into(), t(&[1], &[1.0 + 1.0 / 512.0]))],
            WeightDtype::Bf16,
        )
        .unwrap();
        let mut c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.take("x", &[1]).unwrap().data, vec![1.0]);
        c.finish().unwrap();
        // Truncated file.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }

    #[test]
    fn shards_through_the_index_and_a_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        save(
            &dir.path().join("s1.safetensors"),
            &[("a".into(), t(&[1], &[1.0]))],
            WeightDtype::F32,
        )
        .unwrap();
        save(
            &dir.path().join("s2.safetensors"),
            &[("b".into(), t(&[1], &[2.0]))],
            WeightDtype::F32,
        )
        .unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        )
        .unwrap();
        let mut c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.take("b", &[1]).unwrap().data, vec![2.0]);
        assert_eq!(c.take("a", &[1]).unwrap().data, vec![1.0]);
        c.finish().unwrap();
        std::fs::write(
            &index,
            r#"{"weight_map":{"a":"s1.safetensors","b":"s3.safetensors"}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("s3.safetensors") && e.contains("absent"), "{e}");
        std::fs::remove_file(&index).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
    }
}
