//! Products with at most [`MAX_M`] rows of `A` (a decoding step: one row per sequence), where
//! the time is reading `B` (the weights) from memory: `8 x 512 · 512 x 32128` is 66 MB of `B`
//! for 0.26 GFLOP.
//!
//! `B` is read once, in place: every vector of `B` meets all `m` rows of `A` while it is in
//! a register, so nothing of `B` is packed or copied, and the next block of `B` is requested
//! for L2 while a block is worked on. `A` is packed once per call (at most `16 x k`
//! elements), and the column blocks go to rayon's threads. Each element of `C` is one chain
//! of fused multiply-adds over `k` in order, whatever `m` is: a row computed alone equals the
//! same row computed in a batch, bit for bit.
//!
//! AVX2 and FMA, detected at run time, with strips of 16 columns in AVX-512 registers where
//! the CPU has AVX-512F (the same chain of fused multiply-adds per element, so the same
//! values); [`sgemm`] answers `false` where it does not apply and the caller takes the
//! general path. A wide strip keeps up to 16 rows of `A` in its accumulators; an AVX2 strip
//! takes 8 rows at a time and reads its lines of `B` again (from L1) for the next 8. Taking
//! 9-16 rows here rather than in `gemm` (a small batch, the 16 decoder positions of a
//! one-sequence forward pass) reads the weights in place instead of packing them: a
//! batch-1 forward pass of the bench's mT5-small 0.048-0.053 -> 0.040-0.041 s, greedy
//! generation at batch 16 0.554-0.588 -> 0.470-0.512 s.

/// Rows of `A` this path takes: 16 accumulators of a wide strip fit the 32 AVX-512
/// registers; the AVX2 strips take them 8 rows at a time.
pub const MAX_M: usize = 16;
/// Rows of `A` an AVX2 strip keeps in registers (8 accumulators of its 16 registers).
const NARROW_M: usize = 8;
/// Elements of `B` from which this path takes a product (128 KB): below, `B` stays in cache
/// anyway and `gemm` is as fast.
pub const MIN_B: usize = 1 << 15;
/// Rows of `B` per block.
const KC: usize = 128;
/// Columns of `B` per block (and at most per rayon task).
const NC: usize = 256;

/// `C := A B` for `m <= MAX_M`, `B` with contiguous rows (`b_cs == 1`) and `C` likewise
/// (`c_cs == 1`), when the CPU has AVX2 and FMA; with `wide` (from [`wide`]: the CPU has
/// AVX-512F), in strips of 16 columns in AVX-512 registers first. Returns `false`, touching
/// nothing, when it does not apply.
///
/// # Safety
/// As [`crate::sgemm_strided`]'s; `wide` only where the CPU has AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    threaded: bool,
    wide: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !takes(m, n, k, b_cs) || c_cs != 1 {
            return false;
        }
        let body = |ap: &[f32]| {
            let threads = if threaded {
                rayon::current_num_threads().max(1)
            } else {
                1
            };
            // Column blocks: at most NC wide, at least one per thread when there is work for
            // them, multiples of 16 so that only the last block has a tail.
            let per_thread = n.div_ceil(threads).div_ceil(16) * 16;
            let nc = per_thread.clamp(16, NC);
            let blocks = n.div_ceil(nc);
            let ptrs = Ptrs { b, c };
            let one = |blk: usize| {
                let (b, c) = ptrs.get();
                let (j0, j1) = (blk * nc, ((blk + 1) * nc).min(n));
                // SAFETY: AVX2 and FMA were detected above; the block's columns lie inside B and
                // C (the caller's contract), and blocks write disjoint columns of C.
                unsafe { x86::block(m, k, ap.as_ptr(), b, b_rs, c, c_rs, j0, j1, n, wide) };
            };
            if blocks > 1 && threads > 1 {
                use rayon::prelude::*;
                (0..blocks).into_par_iter().for_each(one);
            } else {
                (0..blocks).for_each(one);
            }
        };
        // SAFETY: A is m x k at these strides (the caller's contract).
        unsafe { with_packed_a(m, k, a, a_rs, a_cs, body) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (
            m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, threaded, wide,
        );
        false
    }
}

thread_local! {
    /// Each thread's buffer for `A` packed (`k * MAX_M` floats, grown as needed).
    static AP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with `A` (`m x k` at these strides, `m <= MAX_M`) packed as
/// `ap[l * MAX_M + i] = A[i][l]`, the `m` values a row of `B` meets; only rows `0..m` of
/// each `l` are written (the kernels read no others). The buffer is this thread's, reused
/// (a fresh one if a product on this thread holds it): a decoding step makes about 70
/// products, and allocating and zeroing 32 KB for each showed in profiles.
///
/// # Safety
/// For `i < m`, `l < k`, `a.offset(i * a_rs + l * a_cs)` must be valid for reads.
pub(crate) unsafe fn with_packed_a<R>(
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let mut own = Vec::new();
    let mut kept = AP.with(|b| b.try_borrow_mut().ok().map(|mut b| std::mem::take(&mut *b)));
    let buf = kept.as_mut().unwrap_or(&mut own);
    if buf.len() < k * MAX_M {
        buf.resize(k * MAX_M, 0.0);
    }
    for i in 0..m {
        for l in 0..k {
            // SAFETY: element (i, l) of A (the caller's contract).
            buf[l * MAX_M + i] = unsafe { *a.offset(i as isize * a_rs + l as isize * a_cs) };
        }
    }
    let out = f(&buf[..k * MAX_M]);
    if let Some(buf) = kept {
        AP.with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                *b = buf;
            }
        });
    }
    out
}

/// Whether [`sgemm`] takes an `m x k · k x n` product whose `B` has column stride `b_cs`
/// (given a `C` with contiguous rows): at most [`MAX_M`] rows, at least 16 columns, a `B`
/// of at least [`MIN_B`] elements read row by row, AVX2 and FMA, the path not turned off.
pub(crate) fn takes(m: usize, n: usize, k: usize, b_cs: isize) -> bool {
    cfg!(target_arch = "x86_64")
        && m > 0
        && m <= MAX_M
        && enabled()
        && k > 0
        && n >= 16
        && k.saturating_mul(n) >= MIN_B
        && b_cs == 1
        && crate::packed::packed_supported()
}

/// Whether this path is on: `PEFT_GEMM_SMALL_M=off` sends these products to `gemm` as well,
/// so that one binary can measure both; read once.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !std::env::var("PEFT_GEMM_SMALL_M").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    })
}

/// Whether the wide strips run: AVX-512F detected and not turned off with
/// `PEFT_GEMM_AVX512=off` (for A/B runs); read once.
pub(crate) fn wide() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let detected = std::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let detected = false;
        detected && !std::env::var("PEFT_GEMM_AVX512").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    })
}

/// The raw pointers the column blocks share between threads.
#[derive(Clone, Copy)]
struct Ptrs {
    b: *const f32,
    c: *mut f32,
}
// SAFETY: `b` is only read, and each task writes its own columns of `c`, while the caller's
// buffers are alive (for the duration of `sgemm`).
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

impl Ptrs {
    /// A method, so that closures capture the `Sync` wrapper and not its fields.
    fn get(&self) -> (*const f32, *mut f32) {
        (self.b, self.c)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KC, MAX_M, NARROW_M};

    /// Columns per strip: one vector. Each row of `A` has its own accumulator, so a strip
    /// holds at most 8 accumulators, a vector of `B` and a broadcast of `A` in registers.
    const WIDTH: usize = 8;
    /// Steps of a block's strips per line of the next block requested for L2: a block of
    /// `r` rows and `w` columns takes `r * w / 8` steps and the next block has at most
    /// `r * w / 16` lines.
    const STEPS_PER_LINE: usize = 2;
    /// Columns per wide strip: one AVX-512 vector, a whole cache line of `B` per step, so a
    /// line of the next block is requested at every step.
    const WIDE: usize = 16;

    /// Columns `j0..j1` of `C := A B` (`n` columns in all), `A` packed (`ap`, see
    /// [`super::sgemm`]); with `wide` (AVX-512F present), strips of [`WIDE`] columns first.
    ///
    /// Block by block of [`KC`] rows, each strip of [`WIDTH`] columns walks down `B` itself,
    /// loading each vector of `B` once for all `m` rows of `A`; the next block (the next rows
    /// of these columns, or the first rows of the next columns) is requested for L2, a line
    /// every [`STEPS_PER_LINE`] steps.
    ///
    /// This replaced a kernel that copied each block of `B` into a buffer and walked it once
    /// per 4 rows of `A` with 16-column strips: with 8 rows, copying `B` took as long as
    /// multiplying it (`sgemm_bench -- decode`: 11.8-12.4 ms per step's products, 8.7-10
    /// ms with the copy left out).
    ///
    /// # Safety
    /// AVX2 and FMA present, and AVX-512F with `wide`; `m <= MAX_M`; `ap` holds `k * MAX_M`
    /// values; rows `0..k` of `B` and `0..m` of `C` are valid at columns `j0..j1`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        m: usize,
        k: usize,
        ap: *const f32,
        b: *const f32,
        b_rs: isize,
        c: *mut f32,
        c_rs: isize,
        j0: usize,
        j1: usize,
        n: usize,
        wide: bool,
    ) {
        let wide_count = if wide { (j1 - j0) / WIDE } else { 0 };
        let narrow_from = j0 + wide_count * WIDE;
        let count = (j1 - narrow_from) / WIDTH;
        let full = narrow_from - j0 + count * WIDTH;
        // The first block, all at once: no earlier block requested it (unless it was this
        // thread's last one, whose lines are then already at hand).
        let mut first = Prefetch::block(b, b_rs, 0, j0, k.min(KC), j1 - j0);
        while first.left > 0 {
            first.step();
        }
        let mut kb = 0;
        while kb < k {
            let ke = (kb + KC).min(k);
            let rows = ke - kb;
            // The block after this one: the next rows of these columns, or the first rows of
            // the next columns (the next block of this thread, unless it is another's).
            let (next_k, next_j) = if ke < k { (ke, j0) } else { (0, j1) };
            let next_cols = n.saturating_sub(next_j).min(j1 - j0);
            let mut next =
                Prefetch::block(b, b_rs, next_k, next_j, (k - next_k).min(KC), next_cols);
            // SAFETY (the whole block): rows kb..ke of B and 0..m of C are valid at columns
            // j0..j1; ap holds k * MAX_M values.
            unsafe {
                let part = Part {
                    ap: ap.add(kb * MAX_M),
                    b: b.offset(kb as isize * b_rs),
                    b_rs,
                    c,
                    c_rs,
                    rows,
                    first: kb == 0,
                };
                for s in 0..wide_count {
                    let j = j0 + s * WIDE;
                    by_rows!(
                        strip_wide,
                        m,
                        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                        MAX_M,
                        (part, j, &mut next)
                    );
                }
                for s in 0..count {
                    let j = narrow_from + s * WIDTH;
                    // At most 8 rows at a time in AVX2 registers; the next 8 read the
                    // strip's lines of `B` again from L1.
                    for i0 in (0..m).step_by(NARROW_M) {
                        let rows = part.rows_from(i0);
                        by_rows!(
                            strip,
                            (m - i0).min(NARROW_M),
                            [1, 2, 3, 4, 5, 6, 7],
                            NARROW_M,
                            (rows, j, &mut next)
                        );
                    }
                }
                // The last columns, one at a time: the same chain of fused multiply-adds.
                for jj in j0 + full..j1 {
                    for i in 0..m {
                        let out = c.offset(i as isize * c_rs).add(jj);
                        let mut s = if kb > 0 { *out } else { 0.0 };
                        for l in kb..ke {
                            s = (*ap.add(l * MAX_M + i))
                                .mul_add(*b.offset(l as isize * b_rs).add(jj), s);
                        }
                        *out = s;
                    }
                }
            }
            kb = ke;
        }
    }

    /// The lines of the next block of `B` still to request, row after row.
    struct Prefetch {
        at: *const f32,
        b_rs: isize,
        per_row: usize,
        left: usize,
        row: usize,
        line: usize,
    }

    impl Prefetch {
        /// The lines of `rows` rows by `cols` columns of `B` from row `k0`, column `j`.
        fn block(
            b: *const f32,
            b_rs: isize,
            k0: usize,
            j: usize,
            rows: usize,
            cols: usize,
        ) -> Self {
            let per_row = cols.div_ceil(16);
            Prefetch {
                at: b.wrapping_offset(k0 as isize * b_rs).wrapping_add(j),
                b_rs,
                per_row,
                left: rows * per_row,
                row: 0,
                line: 0,
            }
        }

        /// Requests the next line for L2, if any is left.
        #[inline(always)]
        fn step(&mut self) {
            if self.left == 0 {
                return;
            }
            let at = self
                .at
                .wrapping_offset(self.row as isize * self.b_rs)
                .wrapping_add(self.line * 16);
            // SAFETY: a prefetch is a hint: it reads nothing architecturally and cannot fault;
            // the address lies inside B anyway while `left > 0`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at as *const i8) };
            self.left -= 1;
            self.line += 1;
            if self.line == self.per_row {
                (self.row, self.line) = (self.row + 1, 0);
            }
        }
    }

    /// One block of `B` and the matching rows of packed `A`, with `C`.
    #[derive(Clone, Copy)]
    struct Part {
        /// `A`, packed, at the block's first row of `B`.
        ap: *const f32,
        /// `B` at the block's first row.
        b: *const f32,
        b_rs: isize,
        c: *mut f32,
        c_rs: isize,
        /// Rows of `B` in the block.
        rows: usize,
        /// Whether this is the first block of `k` (`C` starts from zero, not from itself).
        first: bool,
    }

    impl Part {
        /// The same part for rows `i0..` of `A` and `C`.
        ///
        /// # Safety
        /// `i0 < MAX_M`, and row `i0` of `C` is valid.
        unsafe fn rows_from(self, i0: usize) -> Part {
            // SAFETY: the caller's contract; `ap` rows are `MAX_M` values apart.
            unsafe {
                Part {
                    ap: self.ap.add(i0),
                    c: self.c.offset(i0 as isize * self.c_rs),
                    ..self
                }
            }
        }
    }

    /// Columns `j..j + WIDTH` of the `M` rows of `C`, over the part's rows of `B`.
    ///
    /// # Safety
    /// As [`block`]'s, for these columns.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn strip<const M: usize>(part: Part, j: usize, next: &mut Prefetch) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); M];
            if !part.first {
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm256_loadu_ps(part.c.offset(i as isize * part.c_rs).add(j));
                }
            }
            let mut p = part.b.add(j);
            let mut a = part.ap;
            // A countdown, not `l % STEPS_PER_LINE` with a run-time divisor: a division per
            // step cost more than the step's fused multiply-adds.
            let mut until_step = 0;
            for _ in 0..part.rows {
                if until_step == 0 {
                    next.step();
                    until_step = STEPS_PER_LINE;
                }
                until_step -= 1;
                let bv = _mm256_loadu_ps(p);
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm256_fmadd_ps(_mm256_broadcast_ss(&*a.add(i)), bv, *row);
                }
                p = p.offset(part.b_rs);
                a = a.add(MAX_M);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(part.c.offset(i as isize * part.c_rs).add(j), *row);
            }
        }
    }

    /// [`strip`] on [`WIDE`] columns in AVX-512 registers: the same fused multiply-adds in
    /// the same order, so the same values.
    ///
    /// # Safety
    /// As [`block`]'s with `wide`, for these columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn strip_wide<const M: usize>(part: Part, j: usize, next: &mut Prefetch) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); M];
            if !part.first {
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm512_loadu_ps(part.c.offset(i as isize * part.c_rs).add(j));
                }
            }
            let mut p = part.b.add(j);
            let mut a = part.ap;
            for _ in 0..part.rows {
                next.step();
                let bv = _mm512_loadu_ps(p);
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i)), bv, *row);
                }
                p = p.offset(part.b_rs);
                a = a.add(MAX_M);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(part.c.offset(i as isize * part.c_rs).add(j), *row);
            }
        }
    }
}
