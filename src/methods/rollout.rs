//! Attention Rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
//! <https://arxiv.org/abs/2005.00928>), as people run it on ViTs with jacobgil/vit-explain:
//! each block's attention averaged over heads, its lowest entries optionally discarded, the
//! identity added for the residual connection, rows renormalised, and the blocks multiplied in
//! order; the map is the \[CLS\] row over the patch tokens, divided by its maximum.
//!
//! Departure from vit-explain, on purpose: its `a / a.sum(dim=-1)` divides column `j` by the
//! sum of row `j` (a broadcasting slip); here each row is divided by its own sum, as the paper
//! says, so every rollout matrix is row-stochastic.
//!
//! Rollout ignores the class: every class of an image gets the same map (docs/algorithm.md
//! §8.1).

use serde_json::json;

use super::driver::{Clean, CleanPass, Explanation, Maps, Method, Run, Stage};
use crate::error::{Error, Result};
use crate::model::Backbone;
use crate::resample::torch_bilinear;

/// Attention Rollout settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RolloutParams {
    /// Fraction in [0, 1) of each head-averaged attention matrix's entries, the smallest, set to
    /// zero before the identity is added (never the \[CLS\]-to-\[CLS\] entry). Default 0.9, as
    /// vit-explain's command line; 0 is the paper's plain rollout.
    pub discard_ratio: f64,
}

impl Default for RolloutParams {
    fn default() -> Self {
        Self { discard_ratio: 0.9 }
    }
}

/// Attention Rollout with checked settings.
#[derive(Debug, Clone)]
pub struct Rollout {
    params: RolloutParams,
}

impl Rollout {
    /// Rollout with `params`, validated here.
    pub fn new(params: &RolloutParams) -> Result<Self> {
        if !(0.0..1.0).contains(&params.discard_ratio) {
            return Err(Error::invalid(format!(
                "discard ratio {} out of range; expected a value in [0, 1)",
                params.discard_ratio
            )));
        }
        Ok(Self {
            params: params.clone(),
        })
    }

    /// Rollout for `model`, refused for a model without a \[CLS\] token: rollout reads where
    /// the \[CLS\] token's attention flows, and a model that pools its patch tokens (SigLIP,
    /// average-pooled ViTs without a class token) has no such row. Averaging the patch tokens'
    /// rows instead is sometimes done, but it is a different method with no reference to check
    /// it against, so vitcx says so rather than return it under this name.
    pub fn for_model(params: &RolloutParams, model: &dyn Backbone) -> Result<Self> {
        let spec = model.spec();
        // A model whose attention is not over the whole image (Swin's windows) says why in its
        // spec; there is no matrix to multiply, with or without a class token.
        if let Some(why) = spec
            .details
            .get("no_token_attention")
            .and_then(|v| v.as_str())
        {
            return Err(Error::Unsupported(format!(
                "Attention Rollout multiplies token-to-token attention matrices over the whole image, and {} has none: {why}; use vitcx, rise or gradcam",
                spec.architecture
            )));
        }
        let cls = spec
            .layer_taps
            .last()
            .and_then(|t| spec.tap(t).ok())
            .is_some_and(|t| t.prefix_tokens.first().is_some_and(|p| p == "[CLS]"));
        if !cls {
            return Err(Error::Unsupported(format!(
                "Attention Rollout follows the [CLS] token's attention, and {} has no class token; use vitcx, rise or gradcam",
                spec.architecture
            )));
        }
        Self::new(params)
    }

    /// The settings.
    pub fn params(&self) -> &RolloutParams {
        &self.params
    }
}

impl Method for Rollout {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Attention
    }

    fn maps(&self, run: &mut Run<'_>, clean: Clean, classes: &[usize]) -> Result<Maps> {
        let att = clean
            .attention
            .ok_or_else(|| Error::invalid("the clean pass kept no attention"))?;
        let size = run.size;
        let discard_ratio = self.params.discard_ratio;
        let map = run.stage(Stage::AGGREGATION, || {
            let mut fused = Vec::with_capacity(att.maps.len());
            let mut tokens = 0;
            for m in &att.maps {
                let (_, heads, t, t2) = m.dims4()?;
                if t != t2 {
                    return Err(Error::invalid(format!(
                        "attention map is {t}x{t2}; expected a square token-by-token matrix"
                    )));
                }
                tokens = t;
                fused.push(head_mean(&m.flatten_all()?.to_vec1::<f32>()?, heads, t));
            }
            let (gh, gw) = att.grid;
            if tokens != att.prefix_tokens + gh * gw {
                return Err(Error::invalid(format!(
                    "attention has {tokens} tokens; expected {} prefix + {gh}x{gw} patch tokens",
                    att.prefix_tokens
                )));
            }
            let result = rollout(&mut fused, tokens, discard_ratio);
            let grid = cls_map(&result, tokens, att.prefix_tokens);
            Ok(torch_bilinear(&grid, 1, (gh, gw), size))
        })?;
        Ok(Maps::same_for_each(map, classes.len()))
    }

    fn params_json(&self) -> serde_json::Value {
        json!({
            "head_fusion": "mean",
            "discard_ratio": self.params.discard_ratio,
            "rows": "renormalised to sum 1",
        })
    }

    fn describe(&self, _: &Explanation) -> String {
        format!("Rollout  discard {}", self.params.discard_ratio)
    }
}

/// Mean over heads of one image's attention `(heads, T, T)`, as a `T x T` row-major matrix.
pub fn head_mean(attn: &[f32], heads: usize, t: usize) -> Vec<f64> {
    let mut out = vec![0f64; t * t];
    for head in attn.chunks_exact(t * t).take(heads) {
        for (o, &a) in out.iter_mut().zip(head) {
            *o += f64::from(a);
        }
    }
    let n = heads.max(1) as f64;
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// Sets the `floor(T * T * ratio)` smallest entries of `f` (`T x T`) to zero, except entry 0
/// (\[CLS\] to \[CLS\]) which is never discarded; ties broken by lower index.
pub fn discard_lowest(f: &mut [f64], ratio: f64) {
    let n = (f.len() as f64 * ratio).floor() as usize;
    if n == 0 {
        return;
    }
    let mut idx: Vec<usize> = (0..f.len()).collect();
    idx.select_nth_unstable_by(n - 1, |&a, &b| f[a].total_cmp(&f[b]).then(a.cmp(&b)));
    for &i in &idx[..n] {
        if i != 0 {
            f[i] = 0.0;
        }
    }
}

/// Rolls out head-averaged attention matrices (`T x T` each, in block order; discarded in
/// place): `R = A_L ... A_1` with `A = rownorm((F + I) / 2)`. Returns `R`, row-stochastic.
pub fn rollout(layers: &mut [Vec<f64>], t: usize, discard_ratio: f64) -> Vec<f64> {
    let mut result = identity(t);
    for f in layers.iter_mut() {
        discard_lowest(f, discard_ratio);
        let mut a = f.clone();
        for i in 0..t {
            a[i * t + i] += 1.0;
        }
        for row in a.chunks_exact_mut(t) {
            let s: f64 = row.iter().map(|v| v / 2.0).sum();
            row.iter_mut().for_each(|v| *v = *v / 2.0 / s);
        }
        result = matmul(&a, &result, t);
    }
    result
}

/// The \[CLS\] row of a rollout matrix over the patch tokens (after `prefix` tokens), divided by
/// its maximum (a map that is 0 everywhere stays 0).
pub fn cls_map(result: &[f64], t: usize, prefix: usize) -> Vec<f32> {
    let row = &result[prefix..t];
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let scale = if max > 0.0 { 1.0 / max } else { 0.0 };
    row.iter().map(|&v| (v * scale) as f32).collect()
}

fn identity(t: usize) -> Vec<f64> {
    let mut m = vec![0f64; t * t];
    for i in 0..t {
        m[i * t + i] = 1.0;
    }
    m
}

/// `a @ b` for `T x T` row-major matrices.
fn matmul(a: &[f64], b: &[f64], t: usize) -> Vec<f64> {
    let mut out = vec![0f64; t * t];
    for (arow, orow) in a.chunks_exact(t).zip(out.chunks_exact_mut(t)) {
        for (&aik, brow) in arow.iter().zip(b.chunks_exact(t)) {
            if aik != 0.0 {
                for (o, &bv) in orow.iter_mut().zip(brow) {
                    *o += aik * bv;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random row-stochastic `T x T` matrix from a tiny LCG.
    fn stochastic(t: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut m: Vec<f64> = (0..t * t)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) + 0.01
            })
            .collect();
        for row in m.chunks_exact_mut(t) {
            let sum: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
        m
    }

    #[test]
    fn rollout_rows_sum_to_one_with_and_without_discard() {
        for ratio in [0.0, 0.5, 0.9] {
            let mut layers: Vec<_> = (0..4).map(|k| stochastic(7, k)).collect();
            let r = rollout(&mut layers, 7, ratio);
            for row in r.chunks_exact(7) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{ratio}");
                assert!(row.iter().all(|&v| v >= 0.0));
            }
        }
    }

    #[test]
    fn one_uniform_layer_gives_half_identity_plus_uniform() {
        let t = 4;
        let mut layers = vec![vec![0.25; t * t]];
        let r = rollout(&mut layers, t, 0.0);
        for i in 0..t {
            for j in 0..t {
                let want = if i == j { 0.625 } else { 0.125 };
                assert!((r[i * t + j] - want).abs() < 1e-15);
            }
        }
        // [CLS] row over 3 patch tokens, all equal: a flat map of ones.
        assert_eq!(cls_map(&r, t, 1), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn discard_keeps_cls_to_cls_and_zeroes_the_smallest() {
        let mut f = vec![0.0, 0.4, 0.1, 0.5];
        discard_lowest(&mut f, 0.5); // floor(4 * 0.5) = 2 smallest: entries 0 and 2
        assert_eq!(f, vec![0.0, 0.4, 0.0, 0.5]);
        let mut f = vec![0.3, 0.4, 0.1, 0.5];
        discard_lowest(&mut f, 0.5); // entries 2 and 0; entry 0 is kept
        assert_eq!(f, vec![0.3, 0.4, 0.0, 0.5]);
        let mut f = vec![0.3, 0.4];
        discard_lowest(&mut f, 0.4); // floor(0.8) = 0: nothing
        assert_eq!(f, vec![0.3, 0.4]);
    }

    #[test]
    fn head_mean_averages_heads() {
        let a = [1.0f32, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        assert_eq!(head_mean(&a, 2, 2), vec![2.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn bad_discard_ratio_is_refused() {
        let e = Rollout::new(&RolloutParams { discard_ratio: 1.0 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("discard ratio 1 out of range"), "{e}");
        assert!(Rollout::new(&RolloutParams {
            discard_ratio: -0.1
        })
        .is_err());
    }
}
