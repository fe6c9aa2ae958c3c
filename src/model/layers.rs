//! Layers every family builds from: a linear layer (weight pre-transposed, the bias and the
//! activation fused, bf16 and int8 products packed on first use) and LayerNorm, both on vitcx's CPU
//! kernels. One copy, so that a kernel change reaches every family at once.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::backbone::Precision;
use crate::model::kernels::bf16::PackedBf16;
pub(crate) use crate::model::kernels::gelu::Activation;
use crate::model::kernels::int8::PackedI8;
use crate::model::kernels::transpose::transpose;
use crate::model::kernels::{Packed, PackedLinear};
use crate::model::weights::Weights;

/// A linear layer with its weight stored pre-transposed `(in, out)` and contiguous, and packed
/// for the bf16 (int8) product the first time a bf16 (int8) pass needs it.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    wt: Tensor,
    b: Option<Tensor>,
    packed: OnceLock<PackedBf16>,
    quantised: OnceLock<PackedI8>,
}

impl Linear {
    pub(crate) fn new(
        w: &mut Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let wt = transpose(&w.take(&format!("{name}.weight"), &[out, inp])?)?;
        let b = if bias {
            Some(w.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            wt,
            b,
            packed: OnceLock::new(),
            quantised: OnceLock::new(),
        })
    }

    /// As [`Linear::new`], with the bias when the checkpoint has one.
    pub(crate) fn new_opt(w: &mut Weights, name: &str, out: usize, inp: usize) -> Result<Self> {
        let bias = w.contains(&format!("{name}.bias"));
        Self::new(w, name, out, inp, bias)
    }

    /// From `(out, in)` weights and an optional bias (qkv assembled from separate q, k, v).
    pub(crate) fn from_parts(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        Ok(Linear {
            wt: transpose(&w)?,
            b,
            packed: OnceLock::new(),
            quantised: OnceLock::new(),
        })
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
                Precision::Int8 => return self.product_int8(xs, true, Some(act)),
                Precision::F32 => xs.matmul(&self.wt)?,
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
            Ok(match (precision, &self.b) {
                (Precision::Bf16, _) => self.product_bf16(xs, true, None)?,
                (Precision::Int8, _) => self.product_int8(xs, true, None)?,
                (Precision::F32, Some(b)) => {
                    crate::model::kernels::linear::linear(xs, &self.wt, b)?
                }
                (Precision::F32, None) => xs.matmul(&self.wt)?,
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
        dims.push(self.wt.dim(1)?);
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
                .matmul(&self.wt.to_dtype(DType::BF16)?)?
                .to_dtype(DType::F32)?;
            return Ok(match bias {
                Some(b) => ys.broadcast_add(b)?,
                None => ys,
            });
        }
        let op = PackedLinear {
            packed: self.packed_in(&self.packed)?,
            bias: with_bias,
            act,
        };
        Ok(xs.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    /// `xs (rows, in) @ wt` with int8 products and exact sums, plus the bias if `with_bias`, then
    /// `act` ([`crate::model::kernels::int8`]); the weights are quantised once, on first use.
    fn product_int8(
        &self,
        xs: &Tensor,
        with_bias: bool,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        if !xs.device().is_cpu() {
            return Err(Error::Unsupported(
                "--precision int8 runs on the CPU only; use f32 or bf16 on a GPU".into(),
            ));
        }
        let op = PackedLinear {
            packed: self.packed_in(&self.quantised)?,
            bias: with_bias,
            act,
        };
        Ok(xs.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    /// The weight packed as `P` in `cell`, packed on first use (another thread may pack it
    /// first; either copy is the same).
    fn packed_in<'a, P: Packed>(&self, cell: &'a OnceLock<P>) -> Result<&'a P> {
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let (k, n) = self.wt.dims2()?;
        let wt = self.wt.flatten_all()?.to_vec1::<f32>()?;
        let b = self.b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        let _ = cell.set(P::pack(&wt, k, n, b)?);
        cell.get()
            .ok_or_else(|| Error::invalid(format!("{}: weights not packed", P::NAME)))
    }
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
