//! The picture people look at: a saliency drawn over the original image in the jet colour map,
//! an optional legend strip (text and a colour bar), panels side by side, and the bitmap text
//! they are labelled with. The blend follows pytorch-grad-cam's `show_cam_on_image`.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::resample::torch_bilinear;

/// Colour for v in [0, 1] from the jet colour map (say in the doc which definition: OpenCV COLORMAP_JET as pytorch-grad-cam uses, or matplotlib's).
///
/// Definition: the classic continuous jet (MATLAB's `jet` as a formula),
/// `r = clamp(1.5 - |4v - 3|)`, `g = clamp(1.5 - |4v - 2|)`, `b = clamp(1.5 - |4v - 1|)`,
/// each clamped to [0, 1] and rounded to u8: dark blue `(0, 0, 128)` at 0, cyan, yellow, dark red
/// `(128, 0, 0)` at 1. OpenCV's `COLORMAP_JET` (used by pytorch-grad-cam and the ViT-CX demo)
/// is a 256-entry table sampled from MATLAB's `jet(64)`, the same curve; colours agree to within
/// a few levels, not bit for bit. Values outside [0, 1] are clamped; NaN maps to 0.
pub fn jet(v: f32) -> [u8; 3] {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    let ch = |centre: f32| {
        let c = (1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0);
        (c * 255.0).round() as u8
    };
    [ch(3.0), ch(2.0), ch(1.0)]
}

/// The saliency `(sh, sw)` (row-major) drawn over `original` at the ORIGINAL's size: saliency
/// bilinearly resized to it (PyTorch's rule, [`torch_bilinear`]),
/// min-max normalised to \[0, 1\] (constant map -> all 0), jet-coloured, blended: out = (1-alpha)*image + alpha*colour.
///
/// Errors ([`Error::InvalidArgument`]): an empty image or saliency size, a saliency whose length is
/// not `sh * sw`, a non-finite saliency value, or `alpha` outside [0, 1].
pub fn overlay(
    original: &RgbImage,
    saliency: &[f32],
    sal_size: (usize, usize),
    alpha: f32,
) -> Result<RgbImage> {
    let (sh, sw) = sal_size;
    if sh == 0 || sw == 0 {
        return Err(Error::invalid(format!(
            "saliency size {sh}x{sw}; expected a non-empty map"
        )));
    }
    if sh.checked_mul(sw) != Some(saliency.len()) {
        return Err(Error::invalid(format!(
            "saliency has {} values; expected {sh}x{sw} = {}",
            saliency.len(),
            sh.saturating_mul(sw)
        )));
    }
    if let Some(i) = saliency.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "saliency value {} at index {i}; expected finite values",
            saliency[i]
        )));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::invalid(format!(
            "overlay alpha {alpha}; expected a value in [0, 1]"
        )));
    }
    let (w, h) = original.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::invalid(format!(
            "image is {w}x{h}; expected a non-empty image"
        )));
    }
    let map = torch_bilinear(saliency, 1, sal_size, (h as usize, w as usize));
    let (lo, hi) = map
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    let a = f64::from(alpha);
    let mut out = original.clone();
    for (px, &v) in out.pixels_mut().zip(&map) {
        let t = if range > 0.0 { (v - lo) / range } else { 0.0 };
        let col = jet(t);
        for (p, &c) in px.0.iter_mut().zip(&col) {
            let blended = (1.0 - a) * f64::from(*p) + a * f64::from(c);
            *p = blended.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);

/// Glyph rows for `c` (bit 0 = leftmost pixel); anything outside printable ASCII becomes '?'.
fn glyph(c: char) -> [u8; 8] {
    let c = if c.is_ascii_graphic() || c == ' ' {
        c
    } else {
        '?'
    };
    font8x8::BASIC_FONTS.get(c).unwrap_or([0; 8])
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a `scale x scale` square;
/// pixels falling outside the canvas are skipped.
pub(crate) fn draw_text(canvas: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32) {
    for (k, ch) in text.chars().enumerate() {
        let gx = x as u64 + k as u64 * 8 * scale as u64;
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..8u64 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale as u64 {
                    for dx in 0..scale as u64 {
                        let px = gx + col * scale as u64 + dx;
                        let py = y as u64 + row as u64 * scale as u64 + dy;
                        if px < canvas.width() as u64 && py < canvas.height() as u64 {
                            canvas.put_pixel(px as u32, py as u32, INK);
                        }
                    }
                }
            }
        }
    }
}

/// Adds a legend strip under the image: the given text lines (e.g. "class 2 goldfish  p=0.490", "ViT-CX  N=13 masks") and a
/// small jet colour bar labelled low..high. Readable at any image size (very small images: the canvas widens to fit text; huge: the text scales up).
///
/// Text is black 8x8 bitmap glyphs on white, scaled by `max(1, width / 400)`; non-ASCII
/// characters print as '?'. When the canvas is wider than the image, the image is centred.
pub fn with_legend(img: &RgbImage, lines: &[String]) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = (w / 400).max(1);
    let pad = 4 * s;
    let line_h = 11 * s;
    let glyph_w = 8 * s;
    let text_w = lines
        .iter()
        .map(|l| l.chars().count() as u64)
        .max()
        .unwrap_or(0)
        * u64::from(glyph_w);
    let bar_w = 128 * s;
    let bar_h = 8 * s;
    // "low" + gap + bar + gap + "high"
    let bar_row_w = u64::from(3 * glyph_w + pad + bar_w + pad + 4 * glyph_w);
    let need = text_w.max(bar_row_w) + 2 * u64::from(pad);
    let canvas_w = u32::try_from(need.max(u64::from(w))).unwrap_or(u32::MAX);
    let n_lines = u32::try_from(lines.len()).unwrap_or(u32::MAX / line_h.max(1));
    let strip_h = pad + n_lines.saturating_mul(line_h) + pad + bar_h + pad;
    let canvas_h = h.saturating_add(strip_h);
    let mut canvas = RgbImage::from_pixel(canvas_w, canvas_h, BACKGROUND);
    let x_off = (canvas_w - w) / 2;
    for (x, y, px) in img.enumerate_pixels() {
        canvas.put_pixel(x + x_off, y, *px);
    }
    let mut y = h + pad;
    for line in lines {
        draw_text(&mut canvas, line, pad, y, s);
        y = y.saturating_add(line_h);
    }
    // Colour bar row: "low" [jet bar] "high".
    let y = y.saturating_add(pad);
    let bar_x = pad + 3 * glyph_w + pad;
    for dx in 0..bar_w {
        let col = Rgb(jet(dx as f32 / (bar_w - 1) as f32));
        for dy in 0..bar_h {
            if let Some(p) = canvas.get_pixel_mut_checked(bar_x + dx, y.saturating_add(dy)) {
                *p = col;
            }
        }
    }
    draw_text(&mut canvas, "low", pad, y, s);
    draw_text(&mut canvas, "high", bar_x + bar_w + pad, y, s);
    canvas
}

/// Panels placed left to right, top-aligned, `gap` pixels apart, on the legend background
/// (e.g. one method's map per panel, for comparing methods on one image).
pub fn side_by_side(panels: &[RgbImage], gap: u32) -> RgbImage {
    let w = panels.iter().map(|p| p.width()).sum::<u32>()
        + gap * u32::try_from(panels.len().saturating_sub(1)).unwrap_or(0);
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(0);
    let mut canvas = RgbImage::from_pixel(w, h, BACKGROUND);
    let mut x0 = 0;
    for p in panels {
        for (x, y, px) in p.enumerate_pixels() {
            canvas.put_pixel(x0 + x, y, *px);
        }
        x0 += p.width() + gap;
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hue(c: [u8; 3]) -> f32 {
        let [r, g, b] = c.map(f32::from);
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        if max == min {
            return 0.0;
        }
        let d = max - min;
        let h = if max == r {
            ((g - b) / d).rem_euclid(6.0)
        } else if max == g {
            (b - r) / d + 2.0
        } else {
            (r - g) / d + 4.0
        };
        h * 60.0
    }

    #[test]
    fn jet_endpoints_and_monotone_hue() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(0.5), [128, 255, 128]);
        assert_eq!(jet(-3.0), jet(0.0));
        assert_eq!(jet(7.0), jet(1.0));
        assert_eq!(jet(f32::NAN), jet(0.0));
        // Hue runs from blue (240) down to red (0) without going back.
        let mut prev = f32::INFINITY;
        for i in 0..=1000 {
            let h = hue(jet(i as f32 / 1000.0));
            assert!(h <= prev + 1e-3, "hue rises at {i}: {prev} -> {h}");
            prev = h;
        }
        assert!((hue(jet(0.0)) - 240.0).abs() < 1e-3);
        assert!(hue(jet(1.0)).abs() < 1e-3);
    }

    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, 100]))
    }

    #[test]
    fn side_by_side_places_panels_top_aligned() {
        let a = RgbImage::from_pixel(2, 3, Rgb([1, 2, 3]));
        let b = RgbImage::from_pixel(4, 1, Rgb([9, 9, 9]));
        let c = side_by_side(&[a, b], 1);
        assert_eq!(c.dimensions(), (7, 3));
        assert_eq!(c.get_pixel(1, 2).0, [1, 2, 3]);
        assert_eq!(c.get_pixel(2, 0).0, BACKGROUND.0, "gap");
        assert_eq!(c.get_pixel(3, 0).0, [9, 9, 9]);
        assert_eq!(c.get_pixel(3, 1).0, BACKGROUND.0, "below the shorter panel");
    }

    #[test]
    fn overlay_size_equals_original() {
        let img = photo(37, 23);
        let sal: Vec<f32> = (0..14 * 14).map(|i| i as f32).collect();
        let out = overlay(&img, &sal, (14, 14), 0.5).unwrap();
        assert_eq!(out.dimensions(), (37, 23));
        assert_ne!(out, img);
    }

    #[test]
    fn overlay_alpha_zero_is_original_and_one_is_jet() {
        let img = photo(20, 10);
        let sal = vec![0.0, 1.0, 2.0, 3.0];
        assert_eq!(overlay(&img, &sal, (2, 2), 0.0).unwrap(), img);
        let full = overlay(&img, &sal, (2, 2), 1.0).unwrap();
        // Top-left corner holds the minimum (clamped border), bottom-right the maximum.
        assert_eq!(full.get_pixel(0, 0).0, jet(0.0));
        assert_eq!(full.get_pixel(19, 9).0, jet(1.0));
    }

    #[test]
    fn overlay_constant_saliency_is_low_colour_not_nan() {
        let img = photo(8, 8);
        let out = overlay(&img, &[0.25; 9], (3, 3), 1.0).unwrap();
        assert!(out.pixels().all(|p| p.0 == jet(0.0)));
    }

    #[test]
    fn overlay_rejects_bad_arguments() {
        let img = photo(4, 4);
        for (sal, size, alpha) in [
            (vec![0.0; 5], (2, 2), 0.5),
            (vec![], (0, 2), 0.5),
            (vec![0.0, f32::NAN, 0.0, 0.0], (2, 2), 0.5),
            (vec![0.0; 4], (2, 2), 1.5),
            (vec![0.0; 4], (2, 2), f32::NAN),
        ] {
            let err = overlay(&img, &sal, size, alpha).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
        assert!(overlay(&RgbImage::new(0, 0), &[1.0], (1, 1), 0.5).is_err());
    }

    #[test]
    fn resize_map_matches_torch_bilinear() {
        // torch.nn.functional.interpolate([[0,1],[2,3]], size=4, mode="bilinear", align_corners=False)
        let out = torch_bilinear(&[0.0, 1.0, 2.0, 3.0], 1, (2, 2), (4, 4));
        let row0 = [0.0, 0.25, 0.75, 1.0];
        for (i, v) in out.iter().enumerate() {
            let want = row0[i % 4] + 2.0 * row0[i / 4];
            assert!((v - want).abs() < 1e-6, "{i}: {v} vs {want}");
        }
    }

    fn non_background(img: &RgbImage, y0: u32) -> usize {
        img.enumerate_pixels()
            .filter(|(_, y, p)| *y >= y0 && **p != BACKGROUND)
            .count()
    }

    #[test]
    fn legend_adds_height_and_draws() {
        let img = photo(224, 224);
        let lines = vec![
            "class 2 goldfish  p=0.490".to_string(),
            "ViT-CX  N=13 masks".into(),
        ];
        let out = with_legend(&img, &lines);
        assert_eq!(out.width(), 224);
        assert!(out.height() > 224 + 2 * 8);
        assert!(non_background(&out, 224) > 200);
        // The image itself is untouched at the top.
        assert_eq!(out.get_pixel(10, 10), img.get_pixel(10, 10));
    }

    #[test]
    fn legend_widens_small_and_scales_huge() {
        let small = with_legend(&photo(16, 16), &["a long line of text é".to_string()]);
        assert!(small.width() >= 21 * 8, "width {}", small.width());
        let plain = with_legend(&photo(1200, 10), &["x".to_string()]);
        let none = with_legend(&photo(1200, 10), &[]);
        // Scale 3 at width 1200: one text line adds 33 px.
        assert_eq!(plain.height() - none.height(), 33);
        assert!(non_background(&none, 10) > 0, "colour bar drawn");
    }

    #[test]
    fn non_ascii_prints_as_question_mark() {
        assert_eq!(glyph('é'), glyph('?'));
        assert_ne!(glyph('a'), glyph('?'));
    }

    #[test]
    fn overlay_puts_the_hottest_colour_where_the_saliency_peaks() {
        // A Gaussian blob at grid cell (6, 8) of 14x14, drawn over a 280x200 photo at alpha 1:
        // the pixel coloured as the maximum lies in that cell, scaled to the photo, and the
        // far corner has the minimum's colour.
        let img = photo(280, 200);
        let sal: Vec<f32> = (0..14 * 14)
            .map(|i| {
                let (y, x) = ((i / 14) as f32, (i % 14) as f32);
                (-((x - 8.0).powi(2) + (y - 6.0).powi(2)) / 8.0).exp()
            })
            .collect();
        let out = overlay(&img, &sal, (14, 14), 1.0).unwrap();
        let hot = jet(1.0);
        let (px, py, _) = out
            .enumerate_pixels()
            .min_by_key(|(_, _, p)| {
                (0..3)
                    .map(|c| (i32::from(p.0[c]) - i32::from(hot[c])).abs())
                    .sum::<i32>()
            })
            .unwrap();
        let (cx, cy) = (px as f32 * 14.0 / 280.0, py as f32 * 14.0 / 200.0);
        assert!(
            (cx - 8.5).abs() <= 1.0 && (cy - 6.5).abs() <= 1.0,
            "peak at {px},{py}"
        );
        assert_eq!(out.get_pixel(0, 199).0, jet(0.0));
    }
}
