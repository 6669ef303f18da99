//! Device and precision selection, and host <-> tensor conversion.
//!
//! burn 0.22 has no backend type parameter: the device is a runtime value and every float
//! tensor carries a dtype. All of evl-ecg's tensor code creates tensors through the helpers
//! here so that the choice of `f32`/`f64` and CPU/GPU is made in exactly one place.

use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

/// The compute device handle (burn's): callers above the model crates hold it without naming
/// burn, and get one from [`DeviceSpec::device`].
pub use burn::tensor::Device;
use std::fmt;
use std::str::FromStr;

/// Float precision of a computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats: the training default.
    #[default]
    F32,
    /// 64-bit floats: reference checks and gradient checks.
    F64,
}

impl Precision {
    /// The burn dtype of this precision.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }
}

/// Which device to run on, as a user writes it: `cpu`, `cuda:N` or `vulkan:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// burn's pure-Rust `flex` CPU backend.
    #[default]
    Cpu,
    /// CUDA device with this ordinal (needs the `cuda` cargo feature).
    Cuda(usize),
    /// The N-th discrete GPU through burn's wgpu backend pinned to Vulkan (needs the `vulkan`
    /// cargo feature and a Vulkan driver at run time).
    Vulkan(usize),
}

/// A device string that could not be understood or is not compiled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpecError(String);

impl fmt::Display for DeviceSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeviceSpecError {}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Vulkan(i) => write!(f, "vulkan:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "vulkan" => Ok(DeviceSpec::Vulkan(0)),
            _ => {
                let ordinal = |prefix: &str| s.strip_prefix(prefix).map(str::parse::<usize>);
                match (ordinal("cuda:"), ordinal("vulkan:")) {
                    (Some(Ok(i)), _) => Ok(DeviceSpec::Cuda(i)),
                    (_, Some(Ok(i))) => Ok(DeviceSpec::Vulkan(i)),
                    _ => Err(DeviceSpecError(format!(
                        "unknown device `{s}`: expected `cpu`, `cuda`, `cuda:N`, `vulkan` or `vulkan:N`"
                    ))),
                }
            }
        }
    }
}

impl DeviceSpec {
    /// The burn device, without autodiff.
    ///
    /// # Errors
    /// A CUDA or Vulkan device when the binary was built without that cargo feature.
    pub fn device(self) -> Result<Device, DeviceSpecError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Ok(Device::cuda(i)),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(DeviceSpecError(
                "this build has no CUDA support: rebuild with `--features cuda`".into(),
            )),
            #[cfg(feature = "vulkan")]
            DeviceSpec::Vulkan(i) => Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(i))),
            #[cfg(not(feature = "vulkan"))]
            DeviceSpec::Vulkan(_) => Err(DeviceSpecError(
                "this build has no Vulkan support: rebuild with `--features vulkan`".into(),
            )),
        }
    }
}

/// Whether `t` lives on burn's `flex` CPU backend (with or without autodiff), where the
/// losses' fused host kernels run in place; on a GPU they would cost a round trip, so the
/// losses keep their tensor-op form there.
pub fn on_host<const D: usize>(t: &Tensor<D>) -> bool {
    t.device().without_autodiff() == Device::flex()
}

/// Whether `device` is burn's `flex` CPU backend (with or without autodiff), where host
/// kernels read and write tensors without a transfer.
pub fn is_host(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Builds a float tensor of the given precision from `f64` host values.
///
/// # Panics
/// If `values.len()` is not the product of `shape` (a caller bug).
pub fn tensor_from_f64<const D: usize>(
    values: &[f64],
    shape: [usize; D],
    device: &Device,
    precision: Precision,
) -> Tensor<D> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "tensor_from_f64: {} values for shape {shape:?}",
        values.len()
    );
    let data = match precision {
        Precision::F64 => TensorData::new(values.to_vec(), shape),
        Precision::F32 => TensorData::new(values.iter().map(|&v| v as f32).collect(), shape),
    };
    Tensor::from_data(data, (device, precision.dtype()))
}

/// Builds a float tensor with the dtype of `like` from `f64` host values.
pub fn tensor_like<const D: usize, const E: usize>(
    values: &[f64],
    shape: [usize; D],
    like: &Tensor<E>,
) -> Tensor<D> {
    let precision = if like.dtype() == DType::F64 {
        Precision::F64
    } else {
        Precision::F32
    };
    tensor_from_f64(values, shape, &like.device(), precision)
}

/// Builds a float tensor with the dtype and device of `like` from host values of any float
/// element type, taking ownership (no copy when the element type is already `like`'s).
pub fn tensor_from_vec<T: burn::tensor::Element, const D: usize, const E: usize>(
    values: Vec<T>,
    shape: [usize; D],
    like: &Tensor<E>,
) -> Tensor<D> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "tensor_from_vec: {} values for shape {shape:?}",
        values.len()
    );
    Tensor::from_data(
        TensorData::new(values, shape),
        (&like.device(), like.dtype()),
    )
}

/// Builds a boolean tensor (`true` = valid) from host values.
pub fn bool_tensor<const D: usize>(
    values: &[bool],
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Bool> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Builds an integer tensor from host values.
pub fn int_tensor<const D: usize>(
    values: &[i64],
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Reads a float tensor back to the host as `f64`, whatever its dtype.
///
/// # Panics
/// If the backend cannot read the tensor back (a device failure, not a data error).
pub fn to_vec_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.try_into_vec_as::<f64>()
        .expect("reading a float tensor back to the host")
}

/// Reads a boolean tensor back to the host.
///
/// Backends store booleans differently (`flex` natively; burn's fused GPU backends as `u8`),
/// so anything but a native bool is read through an integer cast.
///
/// # Panics
/// If the backend cannot read the tensor back.
pub fn to_vec_bool<const D: usize>(t: Tensor<D, Bool>) -> Vec<bool> {
    if t.dtype() == DType::Bool(burn::tensor::BoolStore::Native) {
        return t
            .into_data()
            .try_into_vec::<bool>()
            .expect("reading a bool tensor back to the host");
    }
    t.int()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("reading a bool tensor back to the host")
        .into_iter()
        .map(|v| v != 0)
        .collect()
}

/// The precision of a float tensor (`F64` for f64, `F32` for everything else).
pub fn precision_of<const D: usize>(t: &Tensor<D>) -> Precision {
    if t.dtype() == DType::F64 {
        Precision::F64
    } else {
        Precision::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("vulkan".parse::<DeviceSpec>(), Ok(DeviceSpec::Vulkan(0)));
        assert_eq!("vulkan:2".parse::<DeviceSpec>(), Ok(DeviceSpec::Vulkan(2)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("vulkan:".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn f64_round_trip_keeps_precision() {
        let dev = Device::flex();
        let v = [1.0 + 1e-15, -2.5];
        let t = tensor_from_f64(&v, [2], &dev, Precision::F64);
        assert_eq!(t.dtype(), DType::F64);
        assert_eq!(to_vec_f64(t), v.to_vec());
    }
}
