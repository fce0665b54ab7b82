//! An unmerged LoRA adapter's output added to its base layer's, in one pass over the rows:
//! `out = y + ((x A) B + bias) * scaling`, for inference on burn-ndarray.
//!
//! Through burn this is five passes over `[rows, out]`-sized memory: `x A` (a product whose
//! `r` columns, 8 or 16, leave most of `gemm`'s kernel idle), `(x A) B`, the bias, the
//! scaling and the sum, with a new tensor for each. Here each task takes a group of rows:
//! their `x A` stays in registers and a small buffer, and each row of the output is written
//! once, from the row of `y`, while `B` (`r x out`) stays in L1. In a decoding step (a few
//! rows) that also saves burn's per-operation costs: 8-row generation of the bench's
//! mT5-small took 3.5% less time.
//!
//! Each element is computed as burn computes it, in the same order: `h = x A` in the chains
//! of fused multiply-adds over the input features that burn's product sums (one chain, or
//! `gemm`'s depth blocks added in order, as [`peft_gemm::depth_block`] says), `d = h B` one
//! chain over the rank, then `d + bias`, `* scaling`, `y +`, each rounded (no fused
//! multiply-add across them). The values are burn's bit for bit (tested); where burn's
//! products would sum otherwise (one row, which `gemm` takes as a matrix-vector product;
//! tiny shapes) [`lora_add`] declines and the caller takes burn's operations. AVX2 and FMA
//! only, detected at run time; elsewhere [`lora_add`] declines as well.

use rayon::prelude::*;

/// Rows per task: a multiple of the row groups below, enough rows that a task's work
/// (`rows x (in + out) x r` multiply-adds) outweighs handing it to a thread.
const ROWS_PER_TASK: usize = 32;

/// The adapter and its input: `x` is `rows x k` (row-major), `a` is `k x r`, `b` is `r x n`,
/// `bias` has `n` values; `x A` is summed in blocks of `kc` inputs (from [`blocks`]).
pub(super) struct Lora<'a> {
    pub x: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub k: usize,
    pub r: usize,
    pub n: usize,
    pub kc: usize,
    pub scale: f32,
}

/// The depth blocks of `x A` (see [`peft_gemm::depth_block`]) when this pass gives burn's
/// values for `rows` rows of `k` inputs, rank `r` and `n` outputs on this CPU; `None` where it
/// does not (one row, tiny products, no AVX2 and FMA), and burn's operations should run.
pub(super) fn blocks(rows: usize, k: usize, r: usize, n: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::is_x86_feature_detected!("avx2") || !std::is_x86_feature_detected!("fma") {
            return None;
        }
        let kc = peft_gemm::depth_block(rows, r, k)?;
        // `(x A) B`: one chain over the rank.
        (peft_gemm::depth_block(rows, n, r)? >= r).then_some(kc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, k, r, n);
        None
    }
}

/// `y += ((x A) B + bias) * scale` (each element `y + d * scale`, rounded as written) for `y`
/// of `rows x n` (row-major), in place, rows on rayon's threads; the caller asked [`blocks`]
/// first. `None`, with nothing written, when the CPU lacks AVX2 or FMA or the operands'
/// lengths disagree.
pub(super) fn lora_add(y: &mut [f32], lora: &Lora<'_>) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let (k, r, n, kc) = (lora.k, lora.r, lora.n, lora.kc);
        if k == 0 || r == 0 || n == 0 || kc == 0 || !y.len().is_multiple_of(n) {
            return None;
        }
        let rows = y.len() / n;
        if !std::is_x86_feature_detected!("avx2")
            || !std::is_x86_feature_detected!("fma")
            || lora.x.len() != rows.checked_mul(k)?
            || lora.a.len() != k.checked_mul(r)?
            || lora.b.len() != r.checked_mul(n)?
            || lora.bias.is_some_and(|b| b.len() != n)
        {
            return None;
        }
        // A with its columns padded to whole vectors: `ap[l * rp + c] = A[l][c]`, zeros past r.
        let rp = r.div_ceil(8) * 8;
        let mut ap = vec![0.0f32; k * rp];
        for (dst, src) in ap.chunks_exact_mut(rp).zip(lora.a.chunks_exact(r)) {
            dst[..r].copy_from_slice(src);
        }
        let wide = std::is_x86_feature_detected!("avx512f");
        let task = |(t, y): (usize, &mut [f32])| {
            let i0 = t * ROWS_PER_TASK;
            let count = y.len() / n;
            let x = &lora.x[i0 * k..(i0 + count) * k];
            // SAFETY: AVX2 and FMA were detected above, AVX-512F where `wide`; the slices have
            // the lengths checked above for `count` rows.
            unsafe { x86::rows(x, y, &ap, rp, lora, kc, wide) };
        };
        if rows > ROWS_PER_TASK {
            y.par_chunks_mut(ROWS_PER_TASK * n)
                .enumerate()
                .for_each(task);
        } else {
            y.chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(task);
        }
        Some(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (y, lora);
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lora;

    /// Rows of `x A` computed together: one accumulator per row and vector of `r`, so that
    /// 8 chains of fused multiply-adds are in flight.
    const GROUP: usize = 8;

    /// The rows of one task: `x` holds `count x k`, `y` `count x n`, `ap` is `A` padded to
    /// `rp` columns, `x A` summed in blocks of `kc` depths; with `wide`, the output's columns
    /// 16 at a time in AVX-512 registers.
    ///
    /// # Safety
    /// AVX2 and FMA present, AVX-512F with `wide`; the lengths as described.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows(
        x: &[f32],
        y: &mut [f32],
        ap: &[f32],
        rp: usize,
        lora: &Lora<'_>,
        kc: usize,
        wide: bool,
    ) {
        let (k, r, n) = (lora.k, lora.r, lora.n);
        let count = y.len() / n;
        // x A for these rows, `rp` values a row.
        let mut h = [0.0f32; super::ROWS_PER_TASK * 16];
        let mut hv = Vec::new();
        let h: &mut [f32] = if count * rp <= h.len() {
            &mut h[..count * rp]
        } else {
            hv.resize(count * rp, 0.0);
            &mut hv
        };
        let mut i = 0;
        while i < count {
            let g = (count - i).min(GROUP);
            for c in (0..rp).step_by(8) {
                // SAFETY: rows i..i + g of x and h, columns c..c + 8 of ap and h.
                unsafe {
                    match g {
                        GROUP => down::<GROUP>(x, i, k, kc, ap, rp, c, h),
                        _ => {
                            for ii in i..i + g {
                                down::<1>(x, ii, k, kc, ap, rp, c, h);
                            }
                        }
                    }
                }
            }
            i += g;
        }
        for i in 0..count {
            let hr = &h[i * rp..i * rp + r];
            let yr = &mut y[i * n..(i + 1) * n];
            // SAFETY: AVX-512F with `wide` (the caller's contract); hr has r values, yr n.
            let from = if wide {
                unsafe { up_wide(hr, yr, lora) }
            } else {
                0
            };
            // SAFETY: AVX2 and FMA (the caller's contract).
            unsafe { up(hr, yr, lora, from) };
        }
    }

    /// One row's `y[j] += (h B + bias)[j] * scale` for columns `from..`, 8 at a time, then
    /// one at a time: each `d[j]` one chain of fused multiply-adds over the rank from zero.
    ///
    /// # Safety
    /// AVX2 and FMA present; `h` has `r` values, `y` has `n`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn up(h: &[f32], y: &mut [f32], lora: &Lora<'_>, from: usize) {
        let n = lora.n;
        let scale = _mm256_set1_ps(lora.scale);
        let mut j = from;
        while j + 8 <= n {
            // SAFETY: columns j..j + 8 of the rows of B, the bias and y.
            unsafe {
                let mut d = _mm256_setzero_ps();
                for (c, &hc) in h.iter().enumerate() {
                    let bv = _mm256_loadu_ps(lora.b.as_ptr().add(c * n + j));
                    d = _mm256_fmadd_ps(_mm256_set1_ps(hc), bv, d);
                }
                if let Some(bias) = lora.bias {
                    d = _mm256_add_ps(d, _mm256_loadu_ps(bias.as_ptr().add(j)));
                }
                let at = y.as_mut_ptr().add(j);
                _mm256_storeu_ps(
                    at,
                    _mm256_add_ps(_mm256_loadu_ps(at), _mm256_mul_ps(d, scale)),
                );
            }
            j += 8;
        }
        for j in j..n {
            let mut d = 0.0f32;
            for (c, &hc) in h.iter().enumerate() {
                d = hc.mul_add(lora.b[c * n + j], d);
            }
            if let Some(bias) = lora.bias {
                d += bias[j];
            }
            y[j] += d * lora.scale;
        }
    }

    /// [`up`]'s columns 16 at a time in AVX-512 registers (the same operations, so the same
    /// values), as far as whole vectors go; returns the first column left.
    ///
    /// # Safety
    /// AVX-512F present; `h` has `r` values, `y` has `n`.
    #[target_feature(enable = "avx512f")]
    unsafe fn up_wide(h: &[f32], y: &mut [f32], lora: &Lora<'_>) -> usize {
        let n = lora.n;
        let scale = _mm512_set1_ps(lora.scale);
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: columns j..j + 16 of the rows of B, the bias and y.
            unsafe {
                let mut d = _mm512_setzero_ps();
                for (c, &hc) in h.iter().enumerate() {
                    let bv = _mm512_loadu_ps(lora.b.as_ptr().add(c * n + j));
                    d = _mm512_fmadd_ps(_mm512_set1_ps(hc), bv, d);
                }
                if let Some(bias) = lora.bias {
                    d = _mm512_add_ps(d, _mm512_loadu_ps(bias.as_ptr().add(j)));
                }
                let at = y.as_mut_ptr().add(j);
                _mm512_storeu_ps(
                    at,
                    _mm512_add_ps(_mm512_loadu_ps(at), _mm512_mul_ps(d, scale)),
                );
            }
            j += 16;
        }
        j
    }

    /// `h[i + g][c..c + 8] = x[i + g] · ap[.., c..c + 8]` for `g < G`: each element chains of
    /// fused multiply-adds over blocks of `kc` inputs, in order, each from zero, the blocks'
    /// chains added in order (one chain when `kc >= k`).
    ///
    /// # Safety
    /// AVX2 and FMA present; rows `i..i + G` of `x` (`k` values each) and of `h` (`rp` each),
    /// columns `c..c + 8` within `rp`; `kc >= 1`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn down<const G: usize>(
        x: &[f32],
        i: usize,
        k: usize,
        kc: usize,
        ap: &[f32],
        rp: usize,
        c: usize,
        h: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut sum = [_mm256_setzero_ps(); G];
            let xp = x.as_ptr().add(i * k);
            let mut a = ap.as_ptr().add(c);
            for l0 in (0..k).step_by(kc) {
                let mut acc = [_mm256_setzero_ps(); G];
                for l in l0..(l0 + kc).min(k) {
                    let av = _mm256_loadu_ps(a);
                    for (g, row) in acc.iter_mut().enumerate() {
                        *row = _mm256_fmadd_ps(_mm256_set1_ps(*xp.add(g * k + l)), av, *row);
                    }
                    a = a.add(rp);
                }
                if l0 == 0 {
                    sum = acc;
                } else {
                    for (s, a) in sum.iter_mut().zip(acc) {
                        *s = _mm256_add_ps(*s, a);
                    }
                }
            }
            for (g, row) in sum.iter().enumerate() {
                _mm256_storeu_ps(h.as_mut_ptr().add((i + g) * rp + c), *row);
            }
        }
    }
}
