//! The bilinear resampling rules vitcx reproduces, each named after the code it matches to the
//! last bit or the last grey level (docs/algorithm.md §2.3, §6.2, §8.2):
//!
//! - [`opencv_linear_rgb8`]: OpenCV's `cv2.resize(INTER_LINEAR)` on 8-bit images, fixed point
//!   (the reference's image resize);
//! - [`torch_bilinear`] and [`TorchAxis`]: PyTorch's `interpolate(mode="bilinear",
//!   align_corners=False)` in f32 (ViT-CX's masks, Grad-CAM, Rollout, the overlay);
//! - [`skimage_linear_mirror`]: scikit-image's `resize(order=1, mode="reflect")` (RISE's masks);
//! - [`torch_bicubic`]: PyTorch's `interpolate(mode="bicubic", align_corners=False)`, with or
//!   without `antialias` (position embeddings resampled as timm and transformers do).
//!
//! All three put pixel centres at half-integer coordinates, `src = (dst + 0.5) * in / out - 0.5`;
//! they differ in the arithmetic and at the borders.

/// `INTER_RESIZE_COEF_BITS` in OpenCV: interpolation weights are quantised to 11 bits.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// Per destination index along one axis: the left source index and its 11-bit weights
/// `(1 - f, f)`, computed as OpenCV's `resize` does for `INTER_LINEAR` (float coordinate,
/// clamped at the borders, weights rounded half to even).
fn opencv_taps(src: usize, dst: usize) -> Vec<(usize, i32, i32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let mut frac = f - s;
            let mut s = s as i64;
            if s < 0 {
                s = 0;
                frac = 0.0;
            }
            if s >= src as i64 - 1 {
                s = src as i64 - 1;
                frac = 0.0;
            }
            let a0 = ((1.0 - frac) * COEF_SCALE).round_ties_even() as i32;
            let a1 = (frac * COEF_SCALE).round_ties_even() as i32;
            // s is clamped to 0..src above, so the cast is exact.
            (s as usize, a0, a1)
        })
        .collect()
}

/// Resizes an interleaved RGB8 image `(sh, sw)` to `(dh, dw)` like OpenCV's
/// `cv2.resize(..., interpolation=INTER_LINEAR)`, bit for bit: weights quantised to 11 bits, a
/// horizontal pass into integers, then the vertical pass of OpenCV's SIMD kernel
/// (`VResizeLinearVec_32s8u`: rows shifted right by 4, `(b * s) >> 16` per row, then
/// `(sum + 2) >> 2`), which is what the reference's `cv2.resize` runs on x86 and ARM. No
/// antialiasing. An empty size gives an empty buffer.
///
/// Panics if `src.len() != sh * sw * 3`.
pub fn opencv_linear_rgb8(
    src: &[u8],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
) -> Vec<u8> {
    assert_eq!(src.len(), sh * sw * 3, "src must hold (sh, sw, 3) bytes");
    if dh == 0 || dw == 0 || sw == 0 || sh == 0 {
        return Vec::new();
    }
    let xt = opencv_taps(sw, dw);
    let yt = opencv_taps(sh, dh);
    let hrow = |y: usize| -> Vec<i32> {
        let row = &src[y * sw * 3..(y + 1) * sw * 3];
        let mut out = Vec::with_capacity(dw * 3);
        for &(sx, a0, a1) in &xt {
            let nx = (sx + 1).min(sw - 1);
            for c in 0..3 {
                out.push(i32::from(row[sx * 3 + c]) * a0 + i32::from(row[nx * 3 + c]) * a1);
            }
        }
        out
    };
    let mut out = Vec::with_capacity(dh * dw * 3);
    for &(sy, b0, b1) in &yt {
        let r0 = hrow(sy);
        let r1 = hrow((sy + 1).min(sh - 1));
        for (s0, s1) in r0.iter().zip(&r1) {
            let t = ((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16);
            out.push(((t + 2) >> 2).clamp(0, 255) as u8);
        }
    }
    out
}

/// One axis of PyTorch's bilinear upsampling for `align_corners=False` without a scale factor:
/// for each output index, the two source indices and their weights.
#[derive(Debug, Clone)]
pub struct TorchAxis {
    pub(crate) i0: Vec<usize>,
    pub(crate) i1: Vec<usize>,
    pub(crate) l0: Vec<f32>,
    pub(crate) l1: Vec<f32>,
}

impl TorchAxis {
    /// Source indices and weights for `out` samples from `inp` samples (`inp > 0`), in f32 as
    /// `area_pixel_compute_source_index` does: `src = scale * (dst + 0.5) - 0.5`, negative
    /// clamped to 0, the upper neighbour clamped to the last index.
    pub fn new(inp: usize, out: usize) -> Self {
        let scale = inp as f32 / out as f32;
        let mut a = TorchAxis {
            i0: Vec::with_capacity(out),
            i1: Vec::with_capacity(out),
            l0: Vec::with_capacity(out),
            l1: Vec::with_capacity(out),
        };
        for dst in 0..out {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            // src >= 0, so truncation is floor; min() guards float rounding past the end
            let i0 = (src as usize).min(inp - 1);
            let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            a.i0.push(i0);
            a.i1.push(i1);
            a.l0.push(1.0 - l1);
            a.l1.push(l1);
        }
        a
    }

    /// Output indices where a per-cell linear piece of the interpolation can have an extremum:
    /// the first and last sample of every run with the same lower source index. The
    /// interpolated map is bilinear on each cell, so its min and max over the sample grid lie
    /// on these rows and columns.
    pub fn extreme_candidates(&self) -> Vec<usize> {
        let n = self.i0.len();
        (0..n)
            .filter(|&k| {
                k == 0 || k + 1 == n || self.i0[k - 1] != self.i0[k] || self.i0[k + 1] != self.i0[k]
            })
            .collect()
    }

    /// The dense `(out, inp)` interpolation matrix in f64 (rows sum to 1).
    pub fn dense(&self, inp: usize) -> Vec<f64> {
        let out = self.i0.len();
        let mut m = vec![0.0f64; out * inp];
        for k in 0..out {
            m[k * inp + self.i0[k]] += self.l0[k] as f64;
            m[k * inp + self.i1[k]] += self.l1[k] as f64;
        }
        m
    }
}

/// `a * l0 + b * l1` rounded as PyTorch's x86 CPU kernel does it: compiled with FMA
/// contraction, it computes `fma(b, l1, a * l0)`. This makes ViT-CX's masks equal to the
/// reference's to the last bit (checked on the golden cases); plain `a * l0 + b * l1` is off by
/// one ulp at about 15% of the pixels.
#[inline]
fn lerp(a: f32, b: f32, l0: f32, l1: f32) -> f32 {
    b.mul_add(l1, a * l0)
}

/// Value of one upsampled pixel `(y, x)` of a row-major map `gw` wide, in f32 and in the order
/// of PyTorch's CPU kernel (interpolate along the width on both rows, then along the height).
#[inline]
pub fn torch_sample(
    map: &[f32],
    gw: usize,
    ay: &TorchAxis,
    ax: &TorchAxis,
    y: usize,
    x: usize,
) -> f32 {
    let (r0, r1) = (ay.i0[y] * gw, ay.i1[y] * gw);
    let (c0, c1) = (ax.i0[x], ax.i1[x]);
    let t0 = lerp(map[r0 + c0], map[r0 + c1], ax.l0[x], ax.l1[x]);
    let t1 = lerp(map[r1 + c0], map[r1 + c1], ax.l0[x], ax.l1[x]);
    lerp(t0, t1, ay.l0[y], ay.l1[y])
}

/// Bilinear resampling of maps `(D, gh, gw)` to `(D, H, W)` like torch
/// `F.interpolate(mode="bilinear", align_corners=False)`: `src = (dst + 0.5) * gh / H - 0.5`,
/// negative clamped to 0, neighbours clamped to the last row/col; computed in f32 as torch does.
/// Up or down (no antialiasing, as torch without `antialias`).
///
/// Panics if `maps.len() != d * gh * gw` or a grid side is 0 while `d > 0`.
pub fn torch_bilinear(
    maps: &[f32],
    d: usize,
    grid: (usize, usize),
    size: (usize, usize),
) -> Vec<f32> {
    let (gh, gw) = grid;
    let (h, w) = size;
    assert_eq!(maps.len(), d * gh * gw, "maps must hold (D, gh, gw) values");
    let mut out = vec![0.0f32; d * h * w];
    if d == 0 || h == 0 || w == 0 {
        return out;
    }
    let ay = TorchAxis::new(gh, h);
    let ax = TorchAxis::new(gw, w);
    for (map, dst) in maps.chunks_exact(gh * gw).zip(out.chunks_exact_mut(h * w)) {
        for y in 0..h {
            let row = &mut dst[y * w..(y + 1) * w];
            for (x, v) in row.iter_mut().enumerate() {
                *v = torch_sample(map, gw, &ay, &ax, y, x);
            }
        }
    }
    out
}

/// For output pixels `offset..offset + len` of an axis resized from `n` to `out` samples, as
/// scikit-image's `resize(order=1, mode="reflect")` (scipy's `mirror` mode) computes them: the
/// two source indices and the weight of the second, with half-pixel coordinates
/// `(o + 0.5) * n / out - 0.5` mirrored about the first and last sample, in f64.
pub fn skimage_linear_mirror(
    n: usize,
    out: usize,
    offset: usize,
    len: usize,
) -> Vec<(usize, usize, f64)> {
    let scale = n as f64 / out as f64;
    let last = n.saturating_sub(1) as f64;
    (offset..offset + len)
        .map(|o| {
            if n <= 1 {
                return (0, 0, 0.0);
            }
            let mut c = (o as f64 + 0.5) * scale - 0.5;
            if c < 0.0 {
                c = -c;
            }
            if c > last {
                c = 2.0 * last - c;
            }
            let i0 = (c.floor() as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            (i0, i1, c - i0 as f64)
        })
        .collect()
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` of `planes` planes of
/// `src` `(h, w)` to `dst`, f32, row-major `(planes, h, w)`.
///
/// Without `antialias`: Keys' cubic with a = -0.75 at `(dst + 0.5) * in / out - 0.5`, indices
/// clamped at the borders (transformers' `interpolate_pos_encoding`). With `antialias`
/// (timm's `resample_abs_pos_embed`): PyTorch's separable antialiased kernel, a = -0.5, its
/// support widened by the scale when shrinking and its weights normalised, width first.
pub fn torch_bicubic(
    src: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    antialias: bool,
) -> Vec<f32> {
    let taps_w = bicubic_taps(w, ow, antialias);
    let taps_h = bicubic_taps(h, oh, antialias);
    let mut mid = vec![0f32; planes * h * ow];
    for p in 0..planes {
        for y in 0..h {
            let row = &src[(p * h + y) * w..][..w];
            for (x, taps) in taps_w.iter().enumerate() {
                mid[(p * h + y) * ow + x] = taps.iter().map(|&(i, k)| row[i] * k).sum();
            }
        }
    }
    let mut out = vec![0f32; planes * oh * ow];
    for p in 0..planes {
        for (y, taps) in taps_h.iter().enumerate() {
            for x in 0..ow {
                out[(p * oh + y) * ow + x] = taps
                    .iter()
                    .map(|&(i, k)| mid[(p * h + i) * ow + x] * k)
                    .sum();
            }
        }
    }
    out
}

/// For each output index, the (input index, weight) pairs of PyTorch's bicubic rule.
fn bicubic_taps(n_in: usize, n_out: usize, antialias: bool) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f64 / n_out as f64;
    let scale_f = n_in as f32 / n_out as f32;
    if !antialias {
        let last = n_in as i64 - 1;
        return (0..n_out)
            .map(|o| {
                // PyTorch computes the source coordinate and the cubic weights in f32.
                let real = scale_f * (o as f32 + 0.5) - 0.5;
                let base = real.floor();
                let t = real - base;
                let k = cubic_weights(t, -0.75);
                (0..4)
                    .map(|j| {
                        let i = (base as i64 - 1 + j as i64).clamp(0, last) as usize;
                        (i, k[j])
                    })
                    .collect()
            })
            .collect();
    }
    // PyTorch's `_compute_indices_min_size_weights_aa` (interp_size 4, a = -0.5).
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..n_out)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let ws: Vec<f64> = (xmin..xmax)
                .map(|j| aa_cubic((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = ws.iter().sum();
            (xmin..xmax)
                .zip(ws)
                .map(|(j, k)| {
                    (
                        j,
                        if total != 0.0 {
                            (k / total) as f32
                        } else {
                            0.0
                        },
                    )
                })
                .collect()
        })
        .collect()
}

/// Keys' cubic convolution weights of the 4 neighbours at fraction `t` (PyTorch's
/// `get_cubic_upsample_coefficients`).
fn cubic_weights(t: f32, a: f32) -> [f32; 4] {
    let c1 = |x: f32| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// PyTorch's antialiasing bicubic filter (Keys, a = -0.5).
fn aa_cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opencv_2x2_to_4x4() {
        // cv2.resize(np.array([[0,100],[200,40]], np.uint8), (4,4)) (weights 1, .75/.25, .25/.75, 1)
        let grey = [0u8, 100, 200, 40];
        let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
        let out = opencv_linear_rgb8(&rgb, (2, 2), (4, 4));
        let g: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(
            g,
            vec![0, 25, 75, 100, 50, 59, 76, 85, 150, 126, 79, 55, 200, 160, 80, 40]
        );
        assert!(opencv_linear_rgb8(&rgb, (2, 2), (0, 3)).is_empty());
    }

    #[test]
    fn upsample_matches_torch_on_2x2() {
        // torch.nn.functional.interpolate(x, (4, 4), mode="bilinear", align_corners=False)
        let up = torch_bilinear(&[1.0, 2.0, 3.0, 4.0], 1, (2, 2), (4, 4));
        let want = [
            1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0,
        ];
        assert_eq!(up, want);
    }

    #[test]
    fn upsample_same_size_is_identity() {
        let maps: Vec<f32> = (0..30).map(|i| (i * 7 % 11) as f32 - 3.5).collect();
        assert_eq!(torch_bilinear(&maps, 2, (3, 5), (3, 5)), maps);
        // 4 -> 2: source coordinates 0.5 and 2.5.
        let down = torch_bilinear(&[0.0, 1.0, 2.0, 5.0], 1, (1, 4), (1, 2));
        assert_eq!(down, vec![0.5, 3.5]);
    }

    #[test]
    fn skimage_mirrors_at_the_edges() {
        // 2 samples to 6: coordinates -1/3, 0, 1/3, 2/3, 1, 4/3 -> mirrored 1/3, 0, ..., 2/3.
        let a = skimage_linear_mirror(2, 6, 0, 6);
        let w: Vec<f64> = a.iter().map(|t| t.2).collect();
        for (got, want) in w
            .iter()
            .zip([1.0 / 3.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 0.0, 2.0 / 3.0])
        {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(a[4].0, 1);
    }

    #[test]
    fn bicubic_is_the_identity_at_the_same_size_and_keeps_constants() {
        let src: Vec<f32> = (0..2 * 5 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        for aa in [false, true] {
            let same = torch_bicubic(&src, 2, (5, 4), (5, 4), aa);
            assert!(
                same.iter().zip(&src).all(|(a, b)| (a - b).abs() < 1e-6),
                "aa {aa}"
            );
            let flat = vec![0.25f32; 6 * 6];
            for to in [(9, 3), (2, 11)] {
                let out = torch_bicubic(&flat, 1, (6, 6), to, aa);
                assert!(
                    out.iter().all(|v| (v - 0.25).abs() < 1e-6),
                    "aa {aa} {to:?}"
                );
            }
        }
    }

    #[test]
    fn bicubic_matches_torch_on_a_ramp() {
        // torch.nn.functional.interpolate(torch.arange(4.).view(1, 1, 1, 4), size=(1, 6),
        // mode="bicubic", align_corners=False[, antialias=True]) (PyTorch 2.15).
        let close = |got: &[f32], want: &[f32]| {
            got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5)
        };
        let src = [0.0f32, 1.0, 2.0, 3.0];
        let plain = torch_bicubic(&src, 1, (1, 4), (1, 6), false);
        let want = [
            -0.0868056, 0.40625, 1.2129627, 1.7870371, 2.59375, 3.0868058,
        ];
        assert!(close(&plain, &want), "{plain:?}");
        let aa = torch_bicubic(&src, 1, (1, 4), (1, 6), true);
        let want = [
            -0.0657893, 0.4117647, 1.1666667, 1.8333333, 2.5882354, 3.0657897,
        ];
        assert!(close(&aa, &want), "{aa:?}");
        // Shrinking with antialias widens the kernel: squares 0..7 to 3 samples.
        let sq: Vec<f32> = (0..8).map(|i| (i * i) as f32).collect();
        let aa = torch_bicubic(&sq, 1, (1, 8), (1, 3), true);
        let want = [1.0357937, 12.718559, 37.485275];
        assert!(close(&aa, &want), "{aa:?}");
    }
}
