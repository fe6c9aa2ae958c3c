//! RISE (Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
//! Models", BMVC 2018, <https://arxiv.org/abs/1806.07421>), as its reference code computes it:
//! `N` random binary grids of `s x s` cells (each cell kept with probability `p1`) are upsampled
//! bilinearly to `(s + 1)` cells of `ceil(H / s)` pixels, shifted by a random offset below one
//! cell and cropped to the image; the saliency of class `c` is `sum_i p_c(x * m_i) m_i / (N p1)`.
//!
//! The masks are made batch by batch from a seeded generator (mask `i` from stream `i`), so
//! memory does not grow with `N` and the same seed gives the same map; the perturbed forward
//! passes go through the driver's batches, as ViT-CX's.
//! The upsampling is scikit-image's `resize(order=1, mode="reflect")` (docs/algorithm.md §8.2):
//! half-pixel coordinates, mirrored about the first and last cell centres, computed in f64 and
//! stored as f32.

use std::cell::RefCell;
use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::driver::{explain, Clean, CleanPass, Explanation, Maps, Method, Progress, Run, Stage};
use crate::error::{Error, Result};
use crate::model::{Backbone, Precision};
use crate::resample::skimage_linear_mirror;
use crate::target::Targets;

/// The most RISE masks (the paper uses 4,000 to 8,000).
pub const MAX_MASKS: usize = 100_000;
/// The finest RISE grid per side (the paper uses 7; a cell of one pixel at 224 px is 224).
pub const MAX_CELLS: usize = 224;

/// RISE settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RiseParams {
    /// Number of random masks N. Default 4000.
    pub masks: usize,
    /// Grid cells per side, s. Default 8.
    pub cells: usize,
    /// Probability that a cell is kept, p1. Default 0.5.
    pub p1: f64,
    /// Seed of the mask generator. Default 0.
    pub seed: u64,
    /// Masked images per forward pass. Default 32.
    pub batch: usize,
}

impl Default for RiseParams {
    fn default() -> Self {
        Self {
            masks: 4000,
            cells: 8,
            p1: 0.5,
            seed: 0,
            batch: 32,
        }
    }
}

/// One RISE mask before upsampling: its binary grid and its shift.
#[derive(Debug, Clone, PartialEq)]
pub struct GridMask {
    /// `s x s` cells, row-major, 1 = kept.
    pub grid: Vec<f32>,
    /// Crop offset `(row, col)` in pixels of the upsampled grid, each below one cell.
    pub shift: (usize, usize),
}

/// Where the masks come from.
#[derive(Debug, Clone)]
pub enum MaskSource {
    /// Drawn from a ChaCha8 generator: mask `i` from stream `i` of the seed.
    Seeded(u64),
    /// Given grids and shifts (e.g. the reference's stored draw), in order.
    Given(Vec<GridMask>),
}

/// RISE with checked settings and its source of masks.
#[derive(Debug, Clone)]
pub struct Rise {
    params: RiseParams,
    source: MaskSource,
}

impl Rise {
    /// RISE with `params`, validated here.
    pub fn new(params: &RiseParams) -> Result<Self> {
        if params.masks == 0 || params.masks > MAX_MASKS {
            return Err(Error::invalid(format!(
                "RISE masks {} out of range; expected 1 to {MAX_MASKS}",
                params.masks
            )));
        }
        if params.cells == 0 || params.cells > MAX_CELLS {
            return Err(Error::invalid(format!(
                "RISE grid of {} cells out of range; expected 1 to {MAX_CELLS}",
                params.cells
            )));
        }
        if !(params.p1 > 0.0 && params.p1 <= 1.0) {
            return Err(Error::invalid(format!(
                "RISE p1 {} out of range; expected a probability in (0, 1]",
                params.p1
            )));
        }
        crate::methods::driver::check_batch(params.batch, "batch size")?;
        Ok(Self {
            params: params.clone(),
            source: MaskSource::Seeded(params.seed),
        })
    }

    /// The settings.
    pub fn params(&self) -> &RiseParams {
        &self.params
    }

    /// Explains `x` with masks from `source` (`Given` must hold at least N masks of this grid).
    pub fn explain_with(
        &self,
        model: &dyn Backbone,
        x: &[f32],
        targets: &Targets,
        source: &MaskSource,
        progress: &mut dyn Progress,
    ) -> Result<Explanation> {
        let with = Rise {
            params: self.params.clone(),
            source: source.clone(),
        };
        explain(&with, model, x, targets, 0, progress)
    }

    /// Fails unless given masks are at least N, of this grid, shifted less than a cell.
    fn check_source(&self, size: (usize, usize)) -> Result<()> {
        let p = &self.params;
        let s = p.cells;
        if let MaskSource::Given(given) = &self.source {
            if given.len() < p.masks {
                return Err(Error::invalid(format!(
                    "{} masks given; RISE is set to use {}",
                    given.len(),
                    p.masks
                )));
            }
            let cell = cell_size(size, s);
            if let Some(bad) = given
                .iter()
                .find(|m| m.grid.len() != s * s || m.shift.0 >= cell.0 || m.shift.1 >= cell.1)
            {
                return Err(Error::invalid(format!(
                    "given mask has {} cells and shift {:?}; expected {s}x{s} cells and a shift below {cell:?}",
                    bad.grid.len(),
                    bad.shift
                )));
            }
        }
        Ok(())
    }
}

impl Method for Rise {
    fn clean_pass(&self) -> CleanPass {
        CleanPass::Probs
    }

    fn maps(&self, run: &mut Run<'_>, _: Clean, classes: &[usize]) -> Result<Maps> {
        let (h, w) = run.size;
        self.check_source((h, w))?;
        let x = run.x;
        let p = &self.params;
        let s = p.cells;
        let plane = h * w;
        let mut sums = vec![vec![0f64; plane]; classes.len()];
        // The masks of the batch in flight, made by `fill`, consumed in order by `take`.
        let pending: RefCell<VecDeque<Vec<f32>>> = RefCell::new(VecDeque::new());
        run.perturbed(
            p.masks,
            1,
            p.batch,
            Precision::F32,
            Some(Stage::MASKS),
            |i, images| {
                let grid = match &self.source {
                    MaskSource::Seeded(seed) => random_grid(*seed, i as u64, s, p.p1, (h, w)),
                    MaskSource::Given(given) => given[i].clone(),
                };
                let m = upsample(&grid, s, (h, w));
                for xc in x.chunks_exact(plane) {
                    images[0].extend(xc.iter().zip(&m).map(|(&v, &mv)| v * mv));
                }
                pending.borrow_mut().push_back(m);
                Ok(())
            },
            |_, rows| {
                let m = pending
                    .borrow_mut()
                    .pop_front()
                    .ok_or_else(|| Error::invalid("RISE: probabilities without a mask"))?;
                for (sum, &c) in sums.iter_mut().zip(classes) {
                    let pc = f64::from(rows[0][c]);
                    for (acc, &mv) in sum.iter_mut().zip(&m) {
                        *acc += pc * f64::from(mv);
                    }
                }
                Ok(())
            },
        )?;
        let norm = p.masks as f64 * p.p1;
        let maps = run.stage(Stage::AGGREGATION, || {
            Ok(sums
                .into_iter()
                .map(|sum| sum.into_iter().map(|v| (v / norm) as f32).collect())
                .collect())
        })?;
        let mut stats = super::driver::Stats::new();
        stats.insert("n_masks".into(), json!(p.masks));
        Ok(Maps { maps, stats })
    }

    fn params_json(&self) -> serde_json::Value {
        let p = &self.params;
        json!({
            "masks": p.masks, "cells": p.cells, "p1": p.p1, "seed": p.seed, "batch": p.batch,
        })
    }

    fn describe(&self, ex: &Explanation) -> String {
        format!(
            "RISE  N={} masks  s={}",
            ex.count("n_masks").unwrap_or(0),
            self.params.cells
        )
    }
}

/// Cell size `(ceil(H / s), ceil(W / s))` in pixels.
pub fn cell_size((h, w): (usize, usize), s: usize) -> (usize, usize) {
    (h.div_ceil(s), w.div_ceil(s))
}

/// Mask `index` of the seeded draw: `s * s` cells kept with probability `p1`, then the row and
/// column shift, all from ChaCha8 stream `index` of `seed`.
pub fn random_grid(seed: u64, index: u64, s: usize, p1: f64, size: (usize, usize)) -> GridMask {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let grid = (0..s * s)
        .map(|_| f32::from(u8::from(rng.random::<f64>() < p1)))
        .collect();
    let cell = cell_size(size, s);
    let shift = (rng.random_range(0..cell.0), rng.random_range(0..cell.1));
    GridMask { grid, shift }
}

/// The mask `(H, W)`: the grid upsampled to `(s + 1) * cell` pixels per side as scikit-image's
/// `resize(order=1, mode="reflect", anti_aliasing=False)` does, cropped at the shift.
pub fn upsample(m: &GridMask, s: usize, (h, w): (usize, usize)) -> Vec<f32> {
    let cell = cell_size((h, w), s);
    let up = ((s + 1) * cell.0, (s + 1) * cell.1);
    let rows = skimage_linear_mirror(s, up.0, m.shift.0, h);
    let cols = skimage_linear_mirror(s, up.1, m.shift.1, w);
    let mut out = Vec::with_capacity(h * w);
    for &(r0, r1, fr) in &rows {
        let (g0, g1) = (&m.grid[r0 * s..(r0 + 1) * s], &m.grid[r1 * s..(r1 + 1) * s]);
        for &(c0, c1, fc) in &cols {
            let top = f64::from(g0[c0]) * (1.0 - fc) + f64::from(g0[c1]) * fc;
            let bottom = f64::from(g1[c0]) * (1.0 - fc) + f64::from(g1[c1]) * fc;
            out.push((top * (1.0 - fr) + bottom * fr) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_ones_grid_gives_all_ones_mask() {
        let m = GridMask {
            grid: vec![1.0; 64],
            shift: (5, 17),
        };
        let u = upsample(&m, 8, (224, 224));
        assert_eq!(u.len(), 224 * 224);
        assert!(u.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn upsampling_interpolates_between_cell_centres_and_mirrors_at_the_edge() {
        // 2 cells [0, 1] on a 4-pixel image: cell 2, upsampled to 6 pixels, no shift.
        // Coordinates (o + 0.5) / 3 - 0.5 = -1/3, 0, 1/3, 2/3, 1, 4/3 -> mirrored 1/3, ..., 2/3.
        let m = GridMask {
            grid: vec![0.0, 1.0, 0.0, 1.0],
            shift: (0, 0),
        };
        let u = upsample(&m, 2, (4, 4));
        let row: Vec<f32> = u[..4].to_vec();
        let want = [1.0 / 3.0, 0.0, 1.0 / 3.0, 2.0 / 3.0];
        for (a, b) in row.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{row:?}");
        }
        // Shifted by one pixel: the window starts one output pixel later.
        let shifted = upsample(
            &GridMask {
                shift: (0, 1),
                ..m.clone()
            },
            2,
            (4, 4),
        );
        assert!((shifted[3] - 1.0).abs() < 1e-6, "{shifted:?}");
    }

    #[test]
    fn seeded_grids_are_reproducible_and_near_p1() {
        let a = random_grid(3, 7, 8, 0.5, (224, 224));
        assert_eq!(a, random_grid(3, 7, 8, 0.5, (224, 224)));
        assert_ne!(a, random_grid(3, 8, 8, 0.5, (224, 224)));
        assert!(a.shift.0 < 28 && a.shift.1 < 28);
        let kept: f32 = (0..200)
            .flat_map(|i| random_grid(0, i, 8, 0.25, (224, 224)).grid)
            .sum();
        let share = kept / (200.0 * 64.0);
        assert!((share - 0.25).abs() < 0.03, "{share}");
    }

    #[test]
    fn bad_settings_are_refused() {
        for p in [
            RiseParams {
                masks: 0,
                ..Default::default()
            },
            RiseParams {
                p1: 0.0,
                ..Default::default()
            },
            RiseParams {
                cells: 0,
                ..Default::default()
            },
            RiseParams {
                batch: 0,
                ..Default::default()
            },
        ] {
            assert!(Rise::new(&p).is_err(), "{p:?}");
        }
    }
}
