//! Comparing outputs with a reference, in a way that cannot pass on garbage.
//!
//! `f32::max` drops NaN (`NaN.max(x) == x`), so a maximum folded with it reports an all-NaN
//! output as equal to anything. [`max_abs_diff`] instead reports any non-finite value, on
//! either side, as an infinite difference, which fails every `diff <= tol` check.

/// The largest `|a[i] - b[i]|`; `f32::INFINITY` when a value on either side is NaN or
/// infinite, or when the lengths differ.
///
/// ```
/// use peft_core::check::max_abs_diff;
/// assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
/// assert_eq!(max_abs_diff(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
/// assert!(max_abs_diff(&[f32::NAN], &[f32::NAN]) > 1e-4);
/// ```
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let mut max = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if !x.is_finite() || !y.is_finite() || d.is_nan() {
            return f32::INFINITY;
        }
        if d > max {
            max = d;
        }
    }
    max
}

/// Collects comparison failures so that a test over many cases reports every failing case, not
/// only the first.
#[derive(Debug, Default)]
pub struct Failures {
    failures: Vec<String>,
    checked: usize,
}

impl Failures {
    /// A new, empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compares `ours` with `reference` (see [`max_abs_diff`]); records `what` when the
    /// difference exceeds `tol` (or is not finite). Returns the difference.
    pub fn check(&mut self, what: &str, ours: &[f32], reference: &[f32], tol: f32) -> f32 {
        self.checked += 1;
        let d = max_abs_diff(ours, reference);
        if d > tol {
            self.failures.push(if ours.len() != reference.len() {
                format!(
                    "{what}: {} values vs {} in the reference",
                    ours.len(),
                    reference.len()
                )
            } else {
                format!("{what}: max |ours - reference| = {d:e} > {tol:e}")
            });
        }
        d
    }

    /// Records a failure that is not a numeric comparison.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.checked += 1;
        self.failures.push(what.into());
    }

    /// The failures so far.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// `Err` listing every failure (one per line), or `Ok` with the number of checks.
    pub fn finish(self) -> Result<usize, String> {
        if self.failures.is_empty() {
            Ok(self.checked)
        } else {
            Err(format!(
                "{} of {} checks failed:\n  {}",
                self.failures.len(),
                self.checked,
                self.failures.join("\n  ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_inf_never_compare_close() {
        let good = [0.5f32, -1.0, 2.0];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = good;
            v[1] = bad;
            assert_eq!(max_abs_diff(&v, &good), f32::INFINITY);
            assert_eq!(max_abs_diff(&good, &v), f32::INFINITY);
            assert_eq!(max_abs_diff(&v, &v), f32::INFINITY);
        }
        // The fold this replaces passes an all-NaN output: prove the difference.
        let nan = [f32::NAN; 3];
        let folded = nan
            .iter()
            .zip(&good)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(folded <= 1e-4, "f32::max drops NaN");
        assert!(max_abs_diff(&nan, &good) > 1e-4);
        assert_eq!(max_abs_diff(&good, &good[..2]), f32::INFINITY);
    }

    #[test]
    fn failures_lists_every_failing_case() {
        let mut f = Failures::new();
        f.check("a", &[1.0], &[1.0], 1e-4);
        f.check("b", &[f32::NAN], &[1.0], 1e-4);
        f.check("c", &[1.0], &[2.0], 1e-4);
        let err = f.finish().unwrap_err();
        assert!(err.starts_with("2 of 3 checks failed"), "{err}");
        assert!(err.contains("b: max") && err.contains("c: max"), "{err}");
        assert!(!err.contains("a: max"), "{err}");
    }
}
