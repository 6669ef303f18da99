//! Checkpoint tensors <-> burn parameters, by the checkpoint's own names.
//!
//! [`Loader`] takes each parameter from an [`evl_hf::weights::Checkpoint`] with the shape the
//! configuration implies (PyTorch's `[out, in]` linear weights are transposed to burn's
//! `[in, out]` here, once); [`Exporter`] is its mirror image and writes the same names and
//! layouts back, so a distilled student is saved in the layout it was loaded from.

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::{DType, Device, Tensor, TensorData};
use evl_hf::weights::{Checkpoint, Error, HostTensor};

type Result<T> = std::result::Result<T, Error>;

/// Builds burn parameters from a checkpoint on one device, in f32.
pub struct Loader<'a> {
    ckpt: &'a mut Checkpoint,
    device: Device,
}

fn tensor<const D: usize>(t: HostTensor, device: &Device) -> Tensor<D> {
    let mut shape = [0usize; D];
    shape.copy_from_slice(&t.shape);
    Tensor::from_data(TensorData::new(t.data, shape), (device, DType::F32))
}

/// A row-major `[rows, cols]` matrix as a contiguous `[cols, rows]` tensor: done on the host
/// once, because a transposed view would be copied again by every product that reads it.
fn transposed(data: &[f32], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let mut out = vec![0.0f32; data.len()];
    for (r, row) in data.chunks_exact(cols.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    Tensor::from_data(TensorData::new(out, [cols, rows]), (device, DType::F32))
}

impl<'a> Loader<'a> {
    /// A loader over `ckpt` placing parameters on `device`.
    pub fn new(ckpt: &'a mut Checkpoint, device: &Device) -> Self {
        Loader {
            ckpt,
            device: device.clone(),
        }
    }

    /// The device parameters go to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    /// A raw tensor of this shape.
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        Ok(tensor(self.ckpt.take(name, &shape)?, &self.device))
    }

    /// A trainable parameter of this shape.
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<D>>> {
        self.tensor(name, shape).map(Param::from_tensor)
    }

    /// `prefix.weight` `[out, in]` (+ `prefix.bias`) as a burn [`Linear`].
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = self
            .ckpt
            .take(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let w = transposed(&w.data, d_out, d_in, &self.device);
        let bias = if bias {
            Some(self.param(&format!("{prefix}.bias"), [d_out])?)
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(w),
            bias,
        })
    }

    /// A linear map from a weight of another layout flattened to `[out, in]` (a convolution
    /// whose kernel equals its stride).
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn linear_from(&mut self, prefix: &str, shape: &[usize], bias: bool) -> Result<Linear> {
        let t = self.ckpt.take(&format!("{prefix}.weight"), shape)?;
        let d_out = shape[0];
        let d_in = shape[1..].iter().product();
        let w = transposed(&t.data, d_out, d_in, &self.device);
        let bias = if bias {
            Some(self.param(&format!("{prefix}.bias"), [d_out])?)
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(w),
            bias,
        })
    }

    /// `prefix.weight` and `prefix.bias` as a [`LayerNorm`].
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn layer_norm(&mut self, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let mut ln = LayerNormConfig::new(d).with_epsilon(eps).init(&self.device);
        ln.gamma = self.param(&format!("{prefix}.weight"), [d])?;
        ln.beta = Some(self.param(&format!("{prefix}.bias"), [d])?);
        Ok(ln)
    }

    /// `name` (the scale) as an [`RmsNorm`].
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn rms_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            gamma: self.param(name, [d])?,
            epsilon: eps,
        })
    }

    /// An embedding table `[rows, d]`.
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn embedding(&mut self, name: &str, rows: usize, d: usize) -> Result<Embedding> {
        Ok(Embedding {
            weight: self.param(name, [rows, d])?,
        })
    }
}

/// Collects parameters under their checkpoint names, in the checkpoint's layouts.
#[derive(Default)]
pub struct Exporter {
    /// `(name, tensor)` in the order written.
    pub tensors: Vec<(String, HostTensor)>,
}

fn host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .try_into_vec_as::<f32>()
        .unwrap_or_else(|e| panic!("reading a parameter back to the host: {e:?}"));
    HostTensor { shape, data }
}

impl Exporter {
    /// A raw tensor.
    pub fn tensor<const D: usize>(&mut self, name: &str, t: Tensor<D>) {
        self.tensors.push((name.to_string(), host(t)));
    }

    /// A linear layer as `prefix.weight` `[out, in]` (+ bias).
    pub fn linear(&mut self, prefix: &str, l: &Linear) {
        self.tensor(&format!("{prefix}.weight"), l.weight.val().transpose());
        if let Some(b) = &l.bias {
            self.tensor(&format!("{prefix}.bias"), b.val());
        }
    }

    /// A linear layer stored with another weight layout (see [`Loader::linear_from`]).
    pub fn linear_as(&mut self, prefix: &str, l: &Linear, shape: &[usize]) {
        let mut w = host(l.weight.val().transpose());
        w.shape = shape.to_vec();
        self.tensors.push((format!("{prefix}.weight"), w));
        if let Some(b) = &l.bias {
            self.tensor(&format!("{prefix}.bias"), b.val());
        }
    }

    /// A LayerNorm.
    pub fn layer_norm(&mut self, prefix: &str, ln: &LayerNorm) {
        self.tensor(&format!("{prefix}.weight"), ln.gamma.val());
        if let Some(b) = &ln.beta {
            self.tensor(&format!("{prefix}.bias"), b.val());
        }
    }

    /// An RMSNorm.
    pub fn rms_norm(&mut self, name: &str, n: &RmsNorm) {
        self.tensor(name, n.gamma.val());
    }
}
