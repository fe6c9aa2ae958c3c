//! ViT-CX, the explanation method: feature maps -> masks -> clusters -> causal scores -> saliency.
//!
//! Xie, Li, Cao, Zhang, "ViT-CX: Causal Explanation of Vision Transformers", IJCAI 2023
//! (<https://arxiv.org/abs/2211.03064>). The steps and their corner cases follow
//! `spec/algorithm.md`, which restates the reference implementation exactly.
//!
//! Departures from the reference, each on purpose:
//! - the mask similarity is computed in the token-grid space (same numbers, ~1000x cheaper);
//! - noise comes from a seeded generator, so the same call gives the same map twice;
//! - with zero noise the noisy originals equal the clean image, so their forward passes are skipped;
//! - a constant feature map gives an all-zero mask and an uncovered pixel a zero weight
//!   (the reference divides by zero there).

pub mod cluster;
pub mod mask;
pub mod score;

use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::methods::vitcx::cluster::{complete_linkage, Clustering};
use crate::methods::vitcx::mask::{cosine_distances, merge_clusters, raw_masks, Masks};
use crate::methods::vitcx::score::saliency;
use crate::methods::{check_input, input_tensor, probs_of};
use crate::model::{Backbone, Precision, Tap};

/// ViT-CX parameters. Build with [`VitCxParams::default`] and the setters, then [`VitCxParams::check`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VitCxParams {
    /// Block whose first LayerNorm output gives the feature maps; negative counts from the end.
    /// Default -1, the last block (reference: `model.blocks[-1].norm1`).
    pub layer: i64,
    /// Clustering distance threshold in [0, 1]; masks closer than this are merged.
    /// Default 0.1 (reference `distance_threshold`).
    pub threshold: f64,
    /// Standard deviation of the Gaussian noise added outside each mask, in normalised pixel units.
    /// Default 0.1 (paper section 3.3, reference code).
    pub noise_std: f32,
    /// Seed of the noise generator. Default 0: the same inputs give the same saliency.
    pub seed: u64,
    /// Images per forward pass for the perturbed images. Default 32 (the reference's `gpu_batch` is 50).
    pub batch: usize,
    /// Arithmetic of the perturbed passes. Default f32, as the reference; `Bf16` rounds the
    /// linear layers' operands to bf16 (the clean pass, masks and clustering stay f32).
    pub precision: Precision,
}

impl Default for VitCxParams {
    fn default() -> Self {
        Self {
            layer: -1,
            threshold: 0.1,
            noise_std: 0.1,
            seed: 0,
            batch: 32,
            precision: Precision::F32,
        }
    }
}

/// [`VitCxParams`] validated against a model: the layer resolved to a 0-based block index.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedParams {
    /// The resolved 0-based block index.
    pub layer: usize,
    /// The parameters as given.
    pub params: VitCxParams,
}

impl VitCxParams {
    /// Validates the parameters for a model with `depth` blocks.
    pub fn check(&self, depth: usize) -> Result<CheckedParams> {
        let layer = resolve_layer(self.layer, depth)?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::invalid(format!(
                "threshold {} out of range; expected a value in [0, 1]",
                self.threshold
            )));
        }
        if !self.noise_std.is_finite() || self.noise_std < 0.0 {
            return Err(Error::invalid(format!(
                "noise std {} out of range; expected a finite value >= 0",
                self.noise_std
            )));
        }
        if self.batch == 0 {
            return Err(Error::invalid(
                "batch size 0 out of range; expected at least 1",
            ));
        }
        Ok(CheckedParams {
            layer,
            params: self.clone(),
        })
    }
}

/// Resolves a possibly negative layer index (Python style: -1 is the last block).
pub fn resolve_layer(layer: i64, depth: usize) -> Result<usize> {
    let d = depth as i64;
    let resolved = if layer < 0 { d + layer } else { layer };
    if resolved < 0 || resolved >= d {
        return Err(Error::invalid(format!(
            "layer {layer} out of range; model has {depth} blocks (valid: {} to {})",
            -d,
            d - 1
        )));
    }
    Ok(resolved as usize)
}

/// Where the noise of the perturbed images comes from.
#[derive(Debug, Clone)]
pub enum Noise {
    /// Standard-normal draws from a ChaCha8 generator: mask `i` uses stream `i` of `seed`,
    /// so its noise does not depend on the batch size.
    Seeded(u64),
    /// Given standard-normal draws, one `(3, H, W)` vector per mask in mask order
    /// (for reproducing the reference with its stored noise).
    Given(Vec<Vec<f32>>),
}

/// Which stage of an explanation is running, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The clean forward pass (prediction and feature maps).
    Forward,
    /// Upsampling and normalising feature maps into masks.
    Masks,
    /// Mask similarities.
    Similarity,
    /// Agglomerative clustering and merging.
    Clustering,
    /// Forward passes of the perturbed images.
    PerturbedForward,
    /// Causal scores and the saliency map.
    Aggregation,
}

impl Stage {
    /// Short stable name (used in JSON timings and progress bars).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Forward => "forward",
            Stage::Masks => "masks",
            Stage::Similarity => "similarity",
            Stage::Clustering => "clustering",
            Stage::PerturbedForward => "perturbed_forward",
            Stage::Aggregation => "aggregation",
        }
    }
}

/// Receives progress: `start(stage, total_units)` then `advance(n)` as units complete.
pub trait Progress {
    /// A stage begins; `total` units of work (images for forward passes, 1 otherwise).
    fn start(&mut self, stage: Stage, total: u64);
    /// `n` more units of the current stage are done.
    fn advance(&mut self, n: u64);
}

/// Progress sink that ignores everything (library default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: Stage, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// The image-independent half of an explanation: prediction, masks and clustering.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Softmax probabilities of the clean image `(C)`.
    pub probs: Vec<f32>,
    /// Feature maps `(D, gh, gw)` of the chosen layer.
    pub feature_maps: Vec<f32>,
    /// The clustering of the `D` raw masks.
    pub clustering: Clustering,
    /// The merged masks `(N, H, W)`.
    pub masks: Masks,
    /// Seconds spent per stage so far.
    pub timings: Vec<(Stage, f64)>,
}

/// A finished explanation.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// Softmax probabilities of the clean image `(C)`.
    pub probs: Vec<f32>,
    /// The explained classes, in the order asked.
    pub classes: Vec<usize>,
    /// One saliency map `(H, W)` per explained class, row-major.
    pub saliency: Vec<Vec<f32>>,
    /// Saliency size `(H, W)`: the model's input size.
    pub size: (usize, usize),
    /// Number of masks after clustering (N).
    pub n_masks: usize,
    /// Number of raw feature maps before clustering (D).
    pub n_feature_maps: usize,
    /// Seconds per stage.
    pub timings: Vec<(Stage, f64)>,
}

/// The ViT-CX method with checked parameters.
#[derive(Debug, Clone)]
pub struct VitCx {
    params: CheckedParams,
}

impl VitCx {
    /// ViT-CX for `model` with the given parameters (validated here).
    pub fn new(params: &VitCxParams, model: &dyn Backbone) -> Result<Self> {
        Ok(Self {
            params: params.check(model.spec().depth)?,
        })
    }

    /// The checked parameters.
    pub fn params(&self) -> &CheckedParams {
        &self.params
    }

    /// Steps 1-3: predicts `x` `(3, H, W)` (normalised pixels) and builds the clustered masks,
    /// all from one forward pass.
    pub fn prepare(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        progress: &mut dyn Progress,
    ) -> Result<Prepared> {
        let px = input_tensor(model, x)?;
        let (h, w) = model.spec().input_size;
        let mut timings = Vec::new();

        progress.start(Stage::Forward, 1);
        let t = Instant::now();
        let out = model.forward(&px, Some(Tap::Norm1(self.params.layer)))?;
        let probs = probs_of(&out.logits)?;
        let features = out.features.ok_or_else(|| {
            Error::Unsupported("model returned no feature maps for the requested layer".into())
        })?;
        let (_, d, gh, gw) = features.dims4()?;
        let feature_maps = features.flatten_all()?.to_vec1::<f32>()?;
        timings.push((Stage::Forward, t.elapsed().as_secs_f64()));
        progress.advance(1);

        progress.start(Stage::Masks, 1);
        let t = Instant::now();
        let raw = raw_masks(&feature_maps, d, (gh, gw), (h, w));
        timings.push((Stage::Masks, t.elapsed().as_secs_f64()));
        progress.advance(1);

        progress.start(Stage::Similarity, 1);
        let t = Instant::now();
        let dist = cosine_distances(&feature_maps, d, (gh, gw), (h, w));
        timings.push((Stage::Similarity, t.elapsed().as_secs_f64()));
        progress.advance(1);

        progress.start(Stage::Clustering, 1);
        let t = Instant::now();
        let clustering = complete_linkage(&dist, d, self.params.params.threshold)?;
        let masks = merge_clusters(&raw, &clustering.labels, clustering.n_clusters);
        timings.push((Stage::Clustering, t.elapsed().as_secs_f64()));
        progress.advance(1);

        Ok(Prepared {
            probs,
            feature_maps,
            clustering,
            masks,
            timings,
        })
    }

    /// Steps 4-5: runs the perturbed images through the model and turns the probability
    /// differences into one saliency map per class in `classes`.
    pub fn score(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        prepared: Prepared,
        classes: &[usize],
        noise: &Noise,
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let spec = model.spec();
        let (h, w) = spec.input_size;
        check_input(x, (h, w))?;
        let num_classes = prepared.probs.len();
        check_classes(classes, num_classes)?;
        if classes.is_empty() {
            return Err(Error::invalid("no class to explain"));
        }
        let masks = &prepared.masks;
        let n = masks.n;
        if let Noise::Given(draws) = noise {
            if draws.len() < n || draws.iter().any(|z| z.len() != x.len()) {
                return Err(Error::invalid(format!(
                    "given noise has {} draws; expected {n} of length {}",
                    draws.len(),
                    x.len()
                )));
            }
        }
        let sigma = self.params.params.noise_std;
        let with_noise = sigma > 0.0;
        let mut timings = prepared.timings.clone();

        // Masks per chunk: each contributes a masked image and (with noise) a noisy original.
        let per_mask = if with_noise { 2 } else { 1 };
        let chunk = (self.params.params.batch / per_mask).max(1);
        progress.start(Stage::PerturbedForward, (n * per_mask) as u64);
        let t = Instant::now();
        let mut pa = Vec::with_capacity(n * num_classes);
        let mut pb = Vec::with_capacity(n * num_classes);
        let plane = h * w;
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let mut batch = Vec::with_capacity((end - start) * per_mask * x.len());
            let mut noisy = Vec::with_capacity(if with_noise { batch.capacity() / 2 } else { 0 });
            for i in start..end {
                let m = masks.mask(i);
                let z = if with_noise {
                    Some(match noise {
                        Noise::Seeded(seed) => standard_normal(*seed, i as u64, x.len()),
                        Noise::Given(draws) => draws[i].clone(),
                    })
                } else {
                    None
                };
                for (c, xc) in x.chunks_exact(plane).enumerate() {
                    for (u, (&xv, &mv)) in xc.iter().zip(m).enumerate() {
                        let e = match &z {
                            Some(z) => sigma * z[c * plane + u] * (1.0 - mv),
                            None => 0.0,
                        };
                        batch.push(xv * mv + e);
                        if with_noise {
                            noisy.push(xv + e);
                        }
                    }
                }
            }
            let count = end - start;
            batch.extend_from_slice(&noisy);
            let px = Tensor::from_vec(batch, (count * per_mask, 3, h, w), model.device())?;
            let probs = model
                .probs_at(&px, self.params.params.precision)?
                .to_vec2::<f32>()?;
            for row in &probs[..count] {
                pa.extend_from_slice(row);
            }
            if with_noise {
                for row in &probs[count..] {
                    pb.extend_from_slice(row);
                }
            } else {
                for _ in 0..count {
                    pb.extend_from_slice(&prepared.probs);
                }
            }
            progress.advance((count * per_mask) as u64);
        }
        timings.push((Stage::PerturbedForward, t.elapsed().as_secs_f64()));

        progress.start(Stage::Aggregation, 1);
        let t = Instant::now();
        let mut maps = Vec::with_capacity(classes.len());
        for &c in classes {
            // Each class is explained as the reference explains its target: with its own p[c].
            let mut one = saliency(&pa, &pb, num_classes, prepared.probs[c], masks, &[c])?;
            maps.push(
                one.pop()
                    .ok_or_else(|| Error::invalid(format!("no saliency computed for class {c}")))?,
            );
        }
        timings.push((Stage::Aggregation, t.elapsed().as_secs_f64()));
        progress.advance(1);

        Ok(Explanation {
            probs: prepared.probs,
            classes: classes.to_vec(),
            saliency: maps,
            size: (h, w),
            n_masks: n,
            n_feature_maps: prepared.clustering.labels.len(),
            timings,
        })
    }

    /// The whole method: [`VitCx::prepare`] then [`VitCx::score`] with seeded noise.
    /// `classes` empty means the top-1 class.
    pub fn explain(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        classes: &[usize],
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let prepared = self.prepare(model, x, progress)?;
        let classes = if classes.is_empty() {
            vec![argmax(&prepared.probs)]
        } else {
            classes.to_vec()
        };
        let noise = Noise::Seeded(self.params.params.seed);
        self.score(model, x, prepared, &classes, &noise, progress)
    }
}

/// Index of the largest value (first on ties); 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    top_k(v, 1).first().copied().unwrap_or(0)
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Fails unless every class id is below `num_classes`.
pub fn check_classes(classes: &[usize], num_classes: usize) -> Result<()> {
    match classes.iter().find(|&&c| c >= num_classes) {
        Some(c) => Err(Error::invalid(format!(
            "class {c} out of range; model has {num_classes} classes (0 to {})",
            num_classes.saturating_sub(1)
        ))),
        None => Ok(()),
    }
}

/// `len` standard-normal draws from stream `stream` of a ChaCha8 generator seeded with `seed`.
pub fn standard_normal(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_resolution() {
        assert_eq!(resolve_layer(-1, 12).unwrap(), 11);
        assert_eq!(resolve_layer(0, 12).unwrap(), 0);
        assert_eq!(resolve_layer(-12, 12).unwrap(), 0);
        let e = resolve_layer(12, 12).unwrap_err().to_string();
        assert!(
            e.contains("layer 12 out of range; model has 12 blocks"),
            "{e}"
        );
        assert!(resolve_layer(-13, 12).is_err());
    }

    #[test]
    fn params_are_checked() {
        let p = VitCxParams {
            threshold: 1.5,
            ..Default::default()
        };
        let e = p.check(4).unwrap_err().to_string();
        assert!(e.contains("threshold 1.5"), "{e}");
        let p = VitCxParams {
            noise_std: f32::NAN,
            ..Default::default()
        };
        assert!(p.check(4).is_err());
        let p = VitCxParams {
            batch: 0,
            ..Default::default()
        };
        assert!(p.check(4).is_err());
        assert_eq!(VitCxParams::default().check(4).unwrap().layer, 3);
    }

    #[test]
    fn noise_is_reproducible_and_per_stream() {
        let a = standard_normal(7, 0, 1000);
        assert_eq!(a, standard_normal(7, 0, 1000));
        assert_ne!(a, standard_normal(7, 1, 1000));
        assert_ne!(a, standard_normal(8, 0, 1000));
        let mean = a.iter().sum::<f32>() / 1000.0;
        let var = a.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.2, "{mean} {var}");
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(argmax(&[0.3, 0.1]), 0);
        let e = check_classes(&[10], 10).unwrap_err().to_string();
        assert!(
            e.contains("class 10 out of range; model has 10 classes"),
            "{e}"
        );
    }
}
