//! Layers every family builds from: a linear layer (weight pre-transposed, the bias and the
//! activation fused, bf16 and int8 products packed on first use) and LayerNorm, both on vitcx's CPU
//! kernels. One copy, so that a kernel change reaches every family at once.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::backbone::Precision;
use crate::model::kernels::bf16::PackedBf16;
pub(crate) use crate::model::kernels::gelu::Activation;
use crate::model::kernels::integer::{PackedI16, PackedI8};
use crate::model::kernels::packed_f32::PackedF32;
use crate::model::kernels::transpose::transpose;
use crate::model::kernels::with_cpu_f32;
use crate::model::kernels::{Packed, PackedLinear, Panels};
use crate::model::weights::Weights;

/// A linear layer: its f32 weight packed for vitcx's AVX-512F kernel at load (CPU inference),
/// or stored pre-transposed `(in, out)` and contiguous (GPU, training, other CPUs); packed for
/// the bf16 (int8) product the first time a bf16 (int8) pass needs it.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    wt: Weight,
    out: usize,
    b: Option<Tensor>,
    packed: OnceLock<PackedBf16>,
    quantised: OnceLock<PackedI8>,
    quantised16: OnceLock<PackedI16>,
}

/// The f32 weight in the form its products read.
#[derive(Debug, Clone)]
enum Weight {
    /// `(in, out)` for candle's matmul and `gemm`.
    Plain(Tensor),
    /// Packed once at load; the plain `(in, out)` tensor is rebuilt from it the first time a
    /// pass that needs gradients (Grad-CAM) runs through the layer.
    Packed {
        f32: PackedF32,
        plain: OnceLock<Tensor>,
    },
}

impl Linear {
    pub(crate) fn new(
        w: &mut Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(w.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Self::from_parts(weight, b)
    }

    /// As [`Linear::new`], with the bias when the checkpoint has one.
    pub(crate) fn new_opt(w: &mut Weights, name: &str, out: usize, inp: usize) -> Result<Self> {
        let bias = w.contains(&format!("{name}.bias"));
        Self::new(w, name, out, inp, bias)
    }

    /// From `(out, in)` weights and an optional bias (qkv assembled from separate q, k, v).
    /// Packed for the f32 kernel where it runs: an f32 CPU weight that is not being trained,
    /// on a CPU with AVX-512F.
    pub(crate) fn from_parts(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let packable = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
        let wt = if PackedF32::available() && packable(&w) && b.as_ref().is_none_or(packable) {
            let bias = b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            let f32 = with_cpu_f32(&w, "vitcx f32", "weight", |v| {
                PackedF32::from_out_in(v, out, inp, bias)
            })??;
            Weight::Packed {
                f32,
                plain: OnceLock::new(),
            }
        } else {
            Weight::Plain(transpose(&w)?)
        };
        Ok(Linear {
            wt,
            out,
            b,
            packed: OnceLock::new(),
            quantised: OnceLock::new(),
            quantised16: OnceLock::new(),
        })
    }

    /// The `(in, out)` weight as a tensor (rebuilt once from the packed panels if need be).
    fn plain(&self) -> Result<&Tensor> {
        match &self.wt {
            Weight::Plain(t) => Ok(t),
            Weight::Packed { f32, plain } => get_or_make(plain, || {
                Ok(Tensor::from_vec(
                    f32.unpack(),
                    f32.dims(),
                    &candle_core::Device::Cpu,
                )?)
            }),
        }
    }

    /// The packed f32 weight when `xs` may use it (no gradient to carry back through it).
    fn packed_f32(&self, xs: &Tensor) -> Option<&PackedF32> {
        match &self.wt {
            Weight::Packed { f32, .. } if !xs.track_op() && xs.device().is_cpu() => Some(f32),
            _ => None,
        }
    }

    /// `act(self(xs))`, the bias and the activation in one pass; on the CPU in reduced
    /// precision, fused into the product's epilogue (each block of rows while it is in cache).
    pub(crate) fn forward_act(
        &self,
        xs: &Tensor,
        act: Activation,
        precision: Precision,
    ) -> Result<Tensor> {
        use crate::model::kernels::gelu::bias_act;
        self.on_rows(xs, |xs| {
            let ys = match precision {
                Precision::Bf16 if xs.device().is_cpu() => {
                    return self.product_bf16(xs, true, Some(act));
                }
                Precision::Int8 | Precision::Int16 => {
                    return self.product_int(xs, precision, true, Some(act))
                }
                Precision::F32 => match self.packed_f32(xs) {
                    Some(p) => return apply_packed(xs, p, true, Some(act)),
                    None => xs.matmul(self.plain()?)?,
                },
                Precision::Bf16 => self.product_bf16(xs, false, None)?,
            };
            let zeros;
            let bias = match &self.b {
                Some(b) => b,
                None => {
                    zeros = Tensor::zeros(ys.dim(1)?, DType::F32, ys.device())?;
                    &zeros
                }
            };
            Ok(bias_act(&ys, bias, act)?)
        })
    }

    /// `(.., in)` -> `(.., out)`.
    pub(crate) fn forward(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        self.on_rows(xs, |xs| {
            Ok(match precision {
                Precision::Bf16 => self.product_bf16(xs, true, None)?,
                Precision::Int8 | Precision::Int16 => {
                    self.product_int(xs, precision, true, None)?
                }
                Precision::F32 => match (self.packed_f32(xs), &self.b) {
                    (Some(p), _) => apply_packed(xs, p, true, None)?,
                    (None, Some(b)) => crate::model::kernels::linear::linear(xs, self.plain()?, b)?,
                    (None, None) => xs.matmul(self.plain()?)?,
                },
            })
        })
    }

    /// `f` on `xs` `(.., in)` seen as rows `(rows, in)`, its `(rows, out)` result given back the
    /// leading dimensions of `xs`.
    fn on_rows(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let inp = dims.pop().unwrap_or(1);
        let rows = xs.elem_count() / inp.max(1);
        let ys = f(&xs.reshape((rows, inp))?)?;
        dims.push(self.out);
        Ok(ys.reshape(dims)?)
    }

    /// `xs (rows, in) @ wt` with bf16 products and f32 sums, plus the bias if `with_bias`, then
    /// `act` (CPU only). On the CPU this is [`crate::model::kernels::bf16`]'s kernel; elsewhere
    /// candle's bf16 matmul.
    fn product_bf16(
        &self,
        xs: &Tensor,
        with_bias: bool,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let bias = self.b.as_ref().filter(|_| with_bias);
        if !xs.device().is_cpu() {
            let ys = xs
                .to_dtype(DType::BF16)?
                .matmul(&self.plain()?.to_dtype(DType::BF16)?)?
                .to_dtype(DType::F32)?;
            return Ok(match bias {
                Some(b) => ys.broadcast_add(b)?,
                None => ys,
            });
        }
        apply_packed(xs, self.packed_in(&self.packed)?, with_bias, act)
    }

    /// `xs (rows, in) @ wt` with integer products and exact sums (int8 or int16), plus the bias
    /// if `with_bias`, then `act` ([`crate::model::kernels::integer`]); the weights are
    /// quantised once, on first use.
    fn product_int(
        &self,
        xs: &Tensor,
        precision: Precision,
        with_bias: bool,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        if !xs.device().is_cpu() {
            return Err(Error::Unsupported(format!(
                "--precision {} runs on the CPU only; use f32 or bf16 on a GPU",
                precision.name()
            )));
        }
        match precision {
            Precision::Int16 => {
                apply_packed(xs, self.packed_in(&self.quantised16)?, with_bias, act)
            }
            Precision::Int8 => apply_packed(xs, self.packed_in(&self.quantised)?, with_bias, act),
            other => Err(Error::invalid(format!(
                "precision {} has no integer product",
                other.name()
            ))),
        }
    }

    /// The weight packed as `P` in `cell`, packed on first use (another thread may pack it
    /// first; either copy is the same).
    fn packed_in<'a, P: Packed>(&self, cell: &'a OnceLock<P>) -> Result<&'a P> {
        get_or_make(cell, || {
            let b = self.b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            Ok(match &self.wt {
                Weight::Packed { f32, .. } => P::pack_panels(f32, b)?,
                Weight::Plain(t) => {
                    let (k, n) = t.dims2()?;
                    P::pack(&t.flatten_all()?.to_vec1::<f32>()?, k, n, b)?
                }
            })
        })
    }
}

/// The value in `cell`, made by `make` the first time (another thread may set it first; either
/// value is the same).
fn get_or_make<T>(cell: &OnceLock<T>, make: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let _ = cell.set(make()?);
    cell.get()
        .ok_or_else(|| Error::invalid("a weight's packed form was not kept"))
}

/// `xs (rows, in)` through a packed product (inference only: no gradient flows back).
fn apply_packed<P: Packed>(
    xs: &Tensor,
    packed: &P,
    bias: bool,
    act: Option<Activation>,
) -> Result<Tensor> {
    let op = PackedLinear { packed, bias, act };
    Ok(xs.contiguous()?.apply_op1_no_bwd(&op)?)
}

/// LayerNorm over the last dimension, two-pass (mean, then variance of the centred values) as
/// PyTorch does, in one fused op ([`crate::model::kernels::layer_norm`]).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(w: &mut Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.take(&format!("{name}.weight"), &[dim])?,
            bias: w.take(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(crate::model::kernels::layer_norm::layer_norm(
            xs,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}
