//! Line plots of probability curves (deletion and insertion), drawn with the legend's bitmap
//! text, so that `eval` writes pictures without a plotting dependency.

use image::{Rgb, RgbImage};

use super::render::draw_text;

/// A line plot of a curve `y` over `x` (both in [0, 1]) on a white canvas with axes, ticks at
/// 0, 0.5 and 1, and `title` plus the axis names written in 8x8 bitmap text.
pub fn plot_curve(x: &[f64], y: &[f32], title: &str, x_label: &str, y_label: &str) -> RgbImage {
    plot_curves(x, &[(String::new(), y.to_vec())], title, x_label, y_label)
}

/// Line colours of [`plot_curves`], one per series in turn (matplotlib's first six).
const PALETTE: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// Several curves over the same `x` in one plot, each in its colour, with a legend of their
/// labels (empty labels are not listed); otherwise as [`plot_curve`].
pub fn plot_curves(
    x: &[f64],
    series: &[(String, Vec<f32>)],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> RgbImage {
    const W: u32 = 480;
    const H: u32 = 360;
    const LEFT: u32 = 56;
    const RIGHT: u32 = 16;
    const TOP: u32 = 32;
    const BOTTOM: u32 = 48;
    let ink = Rgb([0, 0, 0]);
    let grid = Rgb([220, 220, 220]);
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let to_px = |fx: f64, fy: f64| {
        let px = f64::from(LEFT) + fx.clamp(0.0, 1.0) * f64::from(pw);
        let py = f64::from(TOP + ph) - fy.clamp(0.0, 1.0) * f64::from(ph);
        (px, py)
    };
    // Grid lines and ticks at 0, 0.5, 1.
    for (t, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
        let (gx, gy) = to_px(t, t);
        for yy in TOP..=TOP + ph {
            img.put_pixel(gx as u32, yy, grid);
        }
        for xx in LEFT..=LEFT + pw {
            img.put_pixel(xx, gy as u32, grid);
        }
        let lw = 8 * label.len() as u32;
        draw_text(
            &mut img,
            label,
            (gx as u32).saturating_sub(lw / 2),
            TOP + ph + 6,
            1,
        );
        draw_text(
            &mut img,
            label,
            LEFT.saturating_sub(lw + 6),
            (gy as u32).saturating_sub(4),
            1,
        );
    }
    // Axes.
    for yy in TOP..=TOP + ph {
        img.put_pixel(LEFT, yy, ink);
    }
    for xx in LEFT..=LEFT + pw {
        img.put_pixel(xx, TOP + ph, ink);
    }
    // The curves: straight segments between consecutive points, drawn 2 pixels thick.
    for (k, (label, y)) in series.iter().enumerate() {
        let line = Rgb(PALETTE[k % PALETTE.len()]);
        let mut put = |fx: f64, fy: f64| {
            for (dx, dy) in [(0i64, 0i64), (1, 0), (0, 1), (1, 1)] {
                let (xx, yy) = (fx.round() as i64 + dx, fy.round() as i64 + dy);
                if xx >= 0 && yy >= 0 && xx < i64::from(W) && yy < i64::from(H) {
                    img.put_pixel(xx as u32, yy as u32, line);
                }
            }
        };
        let pts: Vec<(f64, f64)> = x
            .iter()
            .zip(y)
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .map(|(&a, &b)| to_px(a, f64::from(b)))
            .collect();
        if let [only] = pts.as_slice() {
            put(only.0, only.1);
        }
        for seg in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (seg[0], seg[1]);
            let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
            for s in 0..=n {
                let t = s as f64 / n as f64;
                put(x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            }
        }
        if !label.is_empty() {
            // Legend entry at the top right: a colour swatch and the label.
            let ly = TOP + 6 + 12 * k as u32;
            let lx = (LEFT + pw).saturating_sub(8 * label.len() as u32 + 24);
            for yy in ly + 2..ly + 6 {
                for xx in lx..lx + 14 {
                    img.put_pixel(xx, yy, line);
                }
            }
            draw_text(&mut img, label, lx + 18, ly, 1);
        }
    }
    draw_text(&mut img, title, LEFT, 4, 1);
    let xl = 8 * x_label.len() as u32;
    draw_text(&mut img, x_label, LEFT + pw / 2 - xl / 2, H - 20, 1);
    draw_text(&mut img, y_label, 4, TOP - 12, 1);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_has_axes_and_the_curve() {
        let img = plot_curve(&[0.0, 1.0], &[1.0, 0.0], "deletion AUC=0.500", "x", "p");
        assert_eq!(img.dimensions(), (480, 360));
        // The curve passes through the plot centre (0.5, 0.5) in its colour.
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 300, "{blue}");
        assert_eq!(img.get_pixel(56, 200).0, [0, 0, 0]);
    }
}
