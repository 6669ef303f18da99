//! Test support for evl-ecg (a dev-dependency only).
//!
//! - [`Fixture`]: one reference case of `../shared/fixtures` (schema in that directory's
//!   README), with typed accessors that fail with the file and key in the message;
//! - [`allclose`]: numpy's rule `|got - exp| <= atol + rtol * |exp|`, the fixtures' comparison;
//! - [`shared_dir`] / [`fixtures_dir`]: where the shared data lives, with the project's rule
//!   that a missing `../shared` skips loudly on a user's clone and fails under `CI=true`.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variable naming a directory of fixtures with the shared schema.
pub const FIXTURES_ENV: &str = "EVL_FIXTURES_DIR";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crate lives at <root>/crates/<name>")
        .to_path_buf()
}

/// True when running under CI (`CI=true`), where missing shared data is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `../shared` relative to the workspace root, if present.
///
/// Returns `None` (after printing a loud notice) on a clone without it; panics under CI,
/// where a silent skip would hide a broken checkout.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = workspace_root().join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if under_ci() {
        panic!(
            "CI=true but {} is missing: the shared data must be present in CI",
            dir.display()
        );
    }
    say(&format!(
        "SKIPPED: {} not found; this test needs the project's shared data",
        dir.display()
    ));
    None
}

/// Writes one line to stderr past the test harness's output capture (`eprintln!` inside a
/// passing test is swallowed unless `--nocapture`): for a skip that must be loud and for
/// counts a test is required to report.
pub fn say(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    // Nothing useful can be done if stderr itself is gone.
    let _ = writeln!(err, "{line}");
}

/// The fixture directory: `$EVL_FIXTURES_DIR`, else `../shared/fixtures`.
///
/// A directory named by the variable must exist (panics otherwise). The default follows
/// [`shared_dir`]'s skip-or-fail rule.
pub fn fixtures_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var(FIXTURES_ENV) {
        let p = PathBuf::from(&dir);
        assert!(p.is_dir(), "{FIXTURES_ENV}={dir} is not a directory");
        return Some(p);
    }
    shared_dir().map(|d| d.join("fixtures"))
}

/// A numeric tensor from a fixture: shape plus flat row-major data.
///
/// `None` entries are JSON `null`s (only `per_class_auc` has them: skipped classes).
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureTensor {
    /// Dimensions; empty for a scalar.
    pub shape: Vec<usize>,
    /// Flat row-major values.
    pub data: Vec<Option<f64>>,
    /// `f64`, `i64` or `bool`.
    pub dtype: String,
}

impl FixtureTensor {
    /// The values as `f64`.
    ///
    /// # Panics
    /// If any entry is `null`.
    pub fn values(&self) -> Vec<f64> {
        self.data
            .iter()
            .map(|v| v.expect("unexpected null in tensor data"))
            .collect()
    }

    /// The values as `bool` (nonzero = true).
    pub fn bools(&self) -> Vec<bool> {
        self.values().into_iter().map(|v| v != 0.0).collect()
    }

    /// The values as `i64`.
    pub fn ints(&self) -> Vec<i64> {
        self.values().into_iter().map(|v| v as i64).collect()
    }

    /// The shape as a fixed-size array.
    ///
    /// # Panics
    /// If the rank is not `D`.
    pub fn dims<const D: usize>(&self) -> [usize; D] {
        self.shape
            .clone()
            .try_into()
            .unwrap_or_else(|s: Vec<usize>| panic!("expected a rank-{D} tensor, found shape {s:?}"))
    }
}

/// An expected value: a tensor, a scalar, `null`, or a list of integers.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// A tensor.
    Tensor(FixtureTensor),
    /// A plain number.
    Scalar(f64),
    /// `null`: undefined (for example a macro AUC with every class skipped).
    Null,
    /// A plain list of integers.
    Ints(Vec<i64>),
}

/// Comparison tolerances (`|got - exp| <= atol + rtol * |exp|`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// One reference case.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The file it was read from.
    pub path: PathBuf,
    /// Case name.
    pub name: String,
    /// Which function it tests.
    pub family: String,
    /// Parameters (family-specific).
    pub params: Value,
    /// Input tensors by name.
    pub inputs: BTreeMap<String, FixtureTensor>,
    /// Expected outputs by name.
    pub expected: BTreeMap<String, Expected>,
    /// Tolerance for a float64 implementation.
    pub tolerance: Tolerance,
    /// Tolerance for a float32 implementation.
    pub tolerance_f32: Tolerance,
}

fn parse_tensor(v: &Value) -> Option<FixtureTensor> {
    let obj = v.as_object()?;
    let shape = obj
        .get("shape")?
        .as_array()?
        .iter()
        .map(|s| s.as_u64().map(|s| s as usize))
        .collect::<Option<Vec<_>>>()?;
    let data = obj
        .get("data")?
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect::<Vec<_>>();
    let dtype = obj.get("dtype")?.as_str()?.to_string();
    Some(FixtureTensor { shape, data, dtype })
}

impl Fixture {
    /// Reads one fixture file.
    ///
    /// # Errors
    /// A message naming the file and the malformed field.
    pub fn read(path: &Path) -> Result<Fixture, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| format!("{}: missing field `{k}`", path.display()))
        };
        let string = |k: &str| -> Result<String, String> {
            field(k)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{}: field `{k}` is not a string", path.display()))
        };
        let tol = |k: &str| -> Result<Tolerance, String> {
            serde_json::from_value(field(k)?.clone())
                .map_err(|e| format!("{}: field `{k}`: {e}", path.display()))
        };
        let mut inputs = BTreeMap::new();
        for (k, t) in field("inputs")?
            .as_object()
            .ok_or_else(|| format!("{}: `inputs` is not an object", path.display()))?
        {
            let t = parse_tensor(t)
                .ok_or_else(|| format!("{}: input `{k}` is not a tensor", path.display()))?;
            if t.data.len() != t.shape.iter().product::<usize>() {
                return Err(format!(
                    "{}: input `{k}`: {} values for shape {:?}",
                    path.display(),
                    t.data.len(),
                    t.shape
                ));
            }
            inputs.insert(k.clone(), t);
        }
        let mut expected = BTreeMap::new();
        for (k, e) in field("expected")?
            .as_object()
            .ok_or_else(|| format!("{}: `expected` is not an object", path.display()))?
        {
            let e = match e {
                Value::Null => Expected::Null,
                Value::Number(n) => Expected::Scalar(n.as_f64().unwrap_or(f64::NAN)),
                Value::Array(a) => Expected::Ints(
                    a.iter()
                        .map(Value::as_i64)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            format!("{}: expected `{k}`: not a list of integers", path.display())
                        })?,
                ),
                Value::Object(_) => Expected::Tensor(parse_tensor(e).ok_or_else(|| {
                    format!("{}: expected `{k}` is not a tensor", path.display())
                })?),
                _ => {
                    return Err(format!(
                        "{}: expected `{k}` has an unknown form",
                        path.display()
                    ));
                }
            };
            expected.insert(k.clone(), e);
        }
        Ok(Fixture {
            path: path.to_path_buf(),
            name: string("name")?,
            family: string("family")?,
            params: field("params").cloned().unwrap_or(Value::Null),
            inputs,
            expected,
            tolerance: tol("tolerance")?,
            tolerance_f32: tol("tolerance_f32")?,
        })
    }

    /// Every `*.json` in `dir`, sorted by file name.
    ///
    /// # Errors
    /// The first file that cannot be read.
    pub fn read_dir(dir: &Path) -> Result<Vec<Fixture>, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Fixture::read(p)).collect()
    }

    /// An input tensor.
    ///
    /// # Panics
    /// If the input is missing (the message names the fixture).
    pub fn input(&self, key: &str) -> &FixtureTensor {
        self.inputs
            .get(key)
            .unwrap_or_else(|| panic!("{}: missing input `{key}`", self.path.display()))
    }

    /// An optional input tensor.
    pub fn maybe_input(&self, key: &str) -> Option<&FixtureTensor> {
        self.inputs.get(key)
    }

    /// A numeric parameter, or `default` when absent.
    pub fn param_f64(&self, key: &str, default: f64) -> f64 {
        self.params
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(default)
    }

    /// A string parameter.
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params.get(key).and_then(Value::as_str)
    }
}

/// numpy's `allclose` rule for one value. NaN matches only NaN.
pub fn close(got: f64, exp: f64, tol: Tolerance) -> bool {
    if exp.is_nan() || got.is_nan() {
        return exp.is_nan() && got.is_nan();
    }
    (got - exp).abs() <= tol.atol + tol.rtol * exp.abs()
}

/// Compares two equally long slices; on failure, describes the worst element.
///
/// # Errors
/// A message with the index, both values and the tolerance.
pub fn allclose(got: &[f64], exp: &[f64], tol: Tolerance) -> Result<(), String> {
    if got.len() != exp.len() {
        return Err(format!("length {} != expected {}", got.len(), exp.len()));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &e)) in got.iter().zip(exp).enumerate() {
        if !close(g, e, tol) {
            let excess = if g.is_nan() || e.is_nan() {
                f64::INFINITY
            } else {
                (g - e).abs() - tol.atol - tol.rtol * e.abs()
            };
            if worst.is_none_or(|(_, w)| excess > w) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "element {i}: got {:e}, expected {:e} (rtol {:e}, atol {:e})",
            got[i], exp[i], tol.rtol, tol.atol
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allclose_uses_numpy_rule() {
        let t = Tolerance {
            rtol: 1e-3,
            atol: 1e-6,
        };
        assert!(allclose(&[1.0005], &[1.0], t).is_ok());
        assert!(allclose(&[1.002], &[1.0], t).is_err());
        assert!(allclose(&[f64::NAN], &[f64::NAN], t).is_ok());
        assert!(allclose(&[0.0], &[f64::NAN], t).is_err());
    }
}
