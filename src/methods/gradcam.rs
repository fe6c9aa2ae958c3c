//! Grad-CAM (Selvaraju et al., ICCV 2017, <https://arxiv.org/abs/1610.02391>) for ViTs, as
//! pytorch-grad-cam computes it with one target layer and a reshape of the patch tokens to a
//! grid: the gradient of the class logit with respect to the layer's tokens is averaged per
//! channel, the tokens are summed with those weights, `ReLU`, min-max scaled, upsampled
//! bilinearly to the input size (cv2's `INTER_LINEAR`, the same half-pixel rule as the masks of
//! ViT-CX) and min-max scaled again.
//!
//! The layer is the one ViT-CX reads by default, the first LayerNorm of the last block, so the
//! two methods look at the same tokens; the gradient comes from candle's backward pass through
//! the blocks after it.

use std::time::Instant;

use crate::error::Result;
use crate::methods::vitcx::mask::upsample_bilinear;
use crate::methods::vitcx::{resolve_layer, Explanation, Progress, Stage};
use crate::methods::Targets;
use crate::model::{Backbone, Tap};

/// Grad-CAM settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GradCamParams {
    /// Block whose first LayerNorm output is the target layer; negative counts from the end.
    /// Default -1 (the last block, as ViT-CX).
    pub layer: i64,
}

impl Default for GradCamParams {
    fn default() -> Self {
        Self { layer: -1 }
    }
}

/// Grad-CAM with its layer resolved for one model.
#[derive(Debug, Clone)]
pub struct GradCam {
    params: GradCamParams,
    layer: usize,
}

/// The small constant pytorch-grad-cam adds to the maximum when it scales a map to [0, 1].
const SCALE_EPS: f32 = 1e-7;

impl GradCam {
    /// Grad-CAM for `model`, its layer checked here.
    pub fn new(params: &GradCamParams, model: &dyn Backbone) -> Result<Self> {
        Ok(Self {
            layer: resolve_layer(params.layer, model.spec().depth)?,
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

    /// Explains `x` `(3, H, W)` (normalised pixels): one forward and backward pass per class,
    /// all classes in one batch.
    pub fn explain(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        targets: &Targets,
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let px = crate::methods::input_tensor(model, x)?;
        let spec = model.spec();
        let (h, w) = spec.input_size;
        let tap = Tap::Norm1(self.layer);
        let mut timings = Vec::new();

        progress.start(Stage::Forward, 1);
        let t0 = Instant::now();
        // The top-1 class comes from the gradient pass itself; other targets need the
        // probabilities first.
        let (probs, grads) = match targets {
            Targets::TopK(1) => {
                let g = model.tap_gradient(&px, tap, None)?;
                (crate::methods::probs_of(&g.logits)?, g)
            }
            _ => {
                let probs = crate::methods::clean_probs(model, &px)?;
                let classes = targets.resolve(&probs)?;
                let batch = px.repeat((classes.len(), 1, 1, 1))?;
                (probs, model.tap_gradient(&batch, tap, Some(&classes))?)
            }
        };
        let (b, d, gh, gw) = grads.features.dims4()?;
        let feats = grads.features.flatten_all()?.to_vec1::<f32>()?;
        let g = grads.gradients.flatten_all()?.to_vec1::<f32>()?;
        timings.push((Stage::Forward, t0.elapsed().as_secs_f64()));
        progress.advance(1);

        progress.start(Stage::Aggregation, 1);
        let t0 = Instant::now();
        let per = d * gh * gw;
        let saliency = (0..b)
            .map(|i| {
                let range = i * per..(i + 1) * per;
                cam(&feats[range.clone()], &g[range], d, (gh, gw), (h, w))
            })
            .collect();
        timings.push((Stage::Aggregation, t0.elapsed().as_secs_f64()));
        progress.advance(1);

        Ok(Explanation {
            probs,
            classes: grads.classes,
            saliency,
            size: (h, w),
            n_masks: 0,
            n_feature_maps: d,
            timings,
        })
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
    let mut out = upsample_bilinear(&map, 1, grid, size);
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
