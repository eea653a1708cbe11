//! Branch-free f32 `exp` and `erf` that the compiler vectorises, for the elementwise kernels:
//! libm's scalar `erff` and `expf` took a fifth of a MiniLM training step (perf, 2026-11-28).
//! Both are checked against libm over their whole useful range in the tests below.

/// `e^x`, within 2 ulp of libm's `expf`; 0 below -87.3, where the result would be subnormal
/// (subnormal arithmetic is two orders of magnitude slower: measured, a masked softmax whose
/// blocked keys came out as 1e-38 tripled the time of a training step).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let underflow = x < -87.3;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low mantissa bits of `shifted`; reading it from there, rather
    // than with `as i32` (saturating, NaN-checked), keeps the loop vectorisable.
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^r to degree 7 on |r| <= ln2 / 2: truncation error below 1e-8.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = p * f32::from_bits(((n_int + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        e
    }
}

/// The error function as a rational function of x on [-4, 4] (beyond which erf is ±1 in f32),
/// odd numerator of degree 13 over even denominator of degree 8; within 1e-6 of libm's `erff`.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for x in grid(-87.0, 88.0, 200_000) {
            let (fast, exact) = (exp(x), libm::expf(x));
            let ulp = (exact.to_bits() as i64 - fast.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {fast}, libm {exact}, {ulp} ulp");
        }
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(-88.0), 0.0);
    }

    #[test]
    fn erf_is_within_1e6_of_libm() {
        for x in grid(-10.0, 10.0, 200_000) {
            let (fast, exact) = (erf(x), libm::erff(x));
            assert!(
                (fast - exact).abs() <= 1e-6,
                "erf({x}) = {fast}, libm {exact}"
            );
        }
    }
}
