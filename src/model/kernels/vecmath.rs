//! Branch-free float32 math that the compiler vectorises, shared by the CPU kernels
//! ([`super::softmax`], [`super::gelu`]); each kernel compiles it for AVX-512, AVX2 + FMA and
//! baseline x86-64 and picks one at run time.

/// `exp(x)` for `x <= 0` (NaN stays NaN; below -87.3 gives 0 instead of a subnormal, which a
/// softmax whose largest term is 1 cannot tell apart). Branch-free so it vectorises.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    exp_nonpositive_with::<false>(x)
}

/// [`exp_nonpositive`], its polynomial in fused multiply-adds when `FMA` (for kernels compiled
/// for AVX2 + FMA or AVX-512: half the dependent operations, and a little more accurate; on
/// baseline x86-64 `mul_add` would be a libm call).
#[inline(always)]
pub(crate) fn exp_nonpositive_with<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in float32 and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.3);
    let shifted = madd(xc, LOG2E, ROUND);
    let k = shifted - ROUND;
    let r = madd(-k, LN2_LO, madd(-k, LN2_HI, xc));
    // exp(r) for |r| <= ln2 / 2: Taylor to degree 7, Horner form.
    let mut p = 1.0 / 5040.0;
    p = madd(p, r, 1.0 / 720.0);
    p = madd(p, r, 1.0 / 120.0);
    p = madd(p, r, 1.0 / 24.0);
    p = madd(p, r, 1.0 / 6.0);
    p = madd(p, r, 0.5);
    p = madd(p, r, 1.0);
    p = madd(p, r, 1.0);
    // 2^k from its exponent bits; k is in [-126, 0] here, so no overflow (wrapping keeps the
    // dev profile's overflow check, which would stop vectorisation, out of the loop).
    // k as an integer from the bits of `shifted` (its ULP is 1 in [2^23, 2^24)): an `as i32`
    // cast would saturate and check for NaN lane by lane, which stops vectorisation.
    let ki = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((ki.wrapping_add(127) as u32) << 23);
    let y = p * scale;
    let y = if x < -87.3 { 0.0 } else { y };
    // NaN in, NaN out (x != x only for NaN).
    #[allow(clippy::eq_op)]
    let y = if x != x { x } else { y };
    y
}

/// `erf(x)` as PyTorch's vectorised CPU kernels compute it (`Vectorized<float>::erf`, the
/// Abramowitz & Stegun 7.1.26 rational approximation, absolute error below 1.5e-7), so that GELU
/// rounds as the reference does rather than as libm's `erff`.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (P * a + 1.0);
    let r = (((A5 * t + A4) * t + A3) * t + A2) * t + A1;
    let e = exp_nonpositive(-(x * x));
    (1.0 - r * t * e).copysign(x)
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, in PyTorch's order of operations.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `sigmoid(x) = 1 / (1 + exp(-x))`, from `exp` of a non-positive argument on both sides so
/// that neither overflows.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// QuickGELU (OpenAI CLIP): `x * sigmoid(1.702 x)`.
#[inline(always)]
pub(crate) fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(1.702 * x)
}

/// GELU with the tanh approximation, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with
/// `tanh(y) = sign(y) (1 - e) / (1 + e)`, `e = exp(-2|y|)`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let y = C * (x + 0.044_715 * x * x * x);
    let e = exp_nonpositive(-2.0 * y.abs());
    let t = ((1.0 - e) / (1.0 + e)).copysign(y);
    0.5 * x * (1.0 + t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_float_rounding() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = f64::from(exp_nonpositive_with::<true>(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "worst relative error with FMA {worst}");
        assert_eq!(exp_nonpositive_with::<true>(0.0), 1.0);
        assert_eq!(exp_nonpositive_with::<true>(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn erf_and_gelu_match_libm_to_the_approximation_error() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x <= 6.0 {
            let want = erf_f64(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
            x += 0.000_97;
        }
        // 1.5e-7 from the approximation, the rest float32 rounding (PyTorch rounds alike).
        assert!(worst < 7e-7, "worst absolute error {worst}");
        assert!(erf(0.0).abs() < 1e-7); // 1 - r(1): the coefficients sum to 1 up to rounding
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_26).abs() < 1e-6);
        assert_eq!(gelu(-20.0), 0.0);
        assert_eq!(gelu(20.0), 20.0);
        assert!(gelu(f32::NAN).is_nan());
    }

    /// erf in f64 by its Taylor series (|x| < 3) or continued fraction, to 1e-12.
    fn erf_f64(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4)); < 1e-5 here anyway.
            let a = x.abs();
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * a * a) + 3.0 / (4.0 * a.powi(4)));
            return (1.0 - erfc).copysign(x);
        }
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn sigmoid_quick_gelu_and_tanh_gelu_match_f64() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let xd = f64::from(x);
            let s = 1.0 / (1.0 + (-xd).exp());
            assert!((f64::from(sigmoid(x)) - s).abs() < 2e-7, "sigmoid({x})");
            let q = xd / (1.0 + (-1.702 * xd).exp());
            assert!(
                (f64::from(quick_gelu(x)) - q).abs() < 2e-7 * (1.0 + xd.abs()),
                "quick_gelu({x})"
            );
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = 0.5 * xd * (1.0 + (c * (xd + 0.044715 * xd.powi(3))).tanh());
            assert!(
                (f64::from(gelu_tanh(x)) - t).abs() < 2e-7 * (1.0 + xd.abs()),
                "gelu_tanh({x})"
            );
        }
        assert!(sigmoid(f32::NAN).is_nan() && gelu_tanh(f32::NAN).is_nan());
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(gelu_tanh(200.0), 200.0);
    }
}
