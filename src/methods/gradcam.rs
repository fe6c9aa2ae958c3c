//! Grad-CAM (Selvaraju et al., ICCV 2017, <https://arxiv.org/abs/1610.02391>) for ViTs, as
//! pytorch-grad-cam computes it with one target layer and a reshape of the patch tokens to a
//! grid: the gradient of the class logit with respect to the layer's tokens is averaged per
//! channel, the tokens are summed with those weights, `ReLU`, min-max scaled, upsampled
//! bilinearly to the input size (cv2's `INTER_LINEAR`, the same half-pixel rule as the masks of
//! ViT-CX) and min-max scaled again.
//!
//! The layer is the one ViT-CX reads by default, the first LayerNorm of the last block, so the
//! two methods look at the same tokens; the gradient comes from candle's backward pass through
//! the blocks after it (docs/algorithm.md §8.3).

use serde_json::json;

use super::driver::{Clean, CleanPass, Explanation, Maps, Method, Run, Stage};
use crate::error::{Error, Result};
use crate::model::Backbone;
use crate::resample::torch_bilinear;
use crate::target::Score;

/// Grad-CAM settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GradCamParams {
    /// Block whose first LayerNorm output is the target layer; negative counts from the end.
    /// Default -1 (the last block, as ViT-CX).
    pub layer: i64,
    /// A tap by name instead of `layer`'s first norm. Default none.
    pub tap: Option<String>,
    /// What is differentiated. Default the logit, as pytorch-grad-cam's
    /// `ClassifierOutputTarget`.
    pub score: Score,
}

impl Default for GradCamParams {
    fn default() -> Self {
        Self {
            layer: -1,
            tap: None,
            score: Score::Logit,
        }
    }
}

/// Grad-CAM with its tap resolved for one model.
#[derive(Debug, Clone)]
pub struct GradCam {
    params: GradCamParams,
    layer: usize,
    tap: String,
}

/// The small constant pytorch-grad-cam adds to the maximum when it scales a map to [0, 1].
const SCALE_EPS: f32 = 1e-7;

impl GradCam {
    /// Grad-CAM for `model`, its tap checked here.
    pub fn new(params: &GradCamParams, model: &dyn Backbone) -> Result<Self> {
        let spec = model.spec();
        let tap = match &params.tap {
            Some(name) => spec.tap(name)?,
            None => spec.layer_tap(params.layer)?,
        };
        Ok(Self {
            layer: tap.layer,
            tap: tap.name.clone(),
            params: params.clone(),
        })
    }

    /// The settings as given.
    pub fn params(&self) -> &GradCamParams {
        &self.params
    }

    /// The resolved 0-based block.
    pub fn layer(&self) -> usize {
        self.layer
    }
}

impl Method for GradCam {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Gradient {
            tap: self.tap.clone(),
            score: self.params.score,
        }
    }

    fn maps(&self, run: &mut Run<'_>, clean: Clean, classes: &[usize]) -> Result<Maps> {
        let grads = clean
            .gradient
            .ok_or_else(|| Error::invalid("the clean pass took no gradient"))?;
        let (b, d, gh, gw) = grads.features.dims4()?;
        if b != classes.len() {
            return Err(Error::invalid(format!(
                "{b} gradients for {} classes",
                classes.len()
            )));
        }
        let feats = grads.features.flatten_all()?.to_vec1::<f32>()?;
        let g = grads.gradients.flatten_all()?.to_vec1::<f32>()?;
        let size = run.size;
        let maps = run.stage(Stage::AGGREGATION, || {
            let per = d * gh * gw;
            Ok((0..b)
                .map(|i| {
                    let range = i * per..(i + 1) * per;
                    cam(&feats[range.clone()], &g[range], d, (gh, gw), size)
                })
                .collect())
        })?;
        let mut stats = super::driver::Stats::new();
        stats.insert("n_feature_maps".into(), json!(d));
        Ok(Maps { maps, stats })
    }

    fn params_json(&self) -> serde_json::Value {
        json!({
            "layer": self.layer,
            "layer_arg": self.params.layer,
            "tap": self.tap,
            "target": self.params.score.name(),
        })
    }

    fn describe(&self, _: &Explanation) -> String {
        format!("Grad-CAM  layer {}", self.layer)
    }
}

/// The Grad-CAM map `(H, W)` from one image's activations and gradients `(D, gh, gw)`.
pub fn cam(
    activations: &[f32],
    gradients: &[f32],
    d: usize,
    grid: (usize, usize),
    size: (usize, usize),
) -> Vec<f32> {
    let n = grid.0 * grid.1;
    let mut map = vec![0f32; n];
    for (a, g) in activations
        .chunks_exact(n)
        .zip(gradients.chunks_exact(n))
        .take(d)
    {
        let weight = g.iter().sum::<f32>() / n as f32;
        for (m, &v) in map.iter_mut().zip(a) {
            *m += weight * v;
        }
    }
    map.iter_mut().for_each(|v| *v = v.max(0.0));
    scale(&mut map);
    let mut out = torch_bilinear(&map, 1, grid, size);
    scale(&mut out);
    out
}

/// pytorch-grad-cam's `scale_cam_image`: `(v - min) / (1e-7 + max(v - min))`.
fn scale(v: &mut [f32]) {
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    v.iter_mut().for_each(|x| *x -= min);
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter_mut().for_each(|x| *x /= SCALE_EPS + max);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cam_weights_channels_by_mean_gradient_and_clips_negatives() {
        // Two channels on a 1x2 grid: channel 0 weight 1, channel 1 weight -1.
        let act = [1.0, 0.0, 0.0, 1.0];
        let grad = [1.0, 1.0, -1.0, -1.0];
        let m = cam(&act, &grad, 2, (1, 2), (1, 2));
        // raw cam [1, -1] -> relu [1, 0] -> scaled [~1, 0]
        assert!((m[0] - 1.0).abs() < 1e-6 && m[1] == 0.0, "{m:?}");
    }

    #[test]
    fn a_flat_cam_stays_zero() {
        let m = cam(&[1.0; 4], &[0.0; 4], 1, (2, 2), (4, 4));
        assert!(m.iter().all(|&v| v == 0.0));
    }
}
