//! Products with at most [`MAX_M`] rows of `A` (a decoding step: one row per sequence), where
//! the time is reading `B` (the weights) from memory: `8 x 512 · 512 x 32128` is 66 MB of `B`
//! for 0.26 GFLOP.
//!
//! `B` is streamed once, in blocks of [`KC`] rows by at most [`NC`] columns (136 KB, held in
//! L2 while every column strip of the block is done), with no packing of `B`; `A` is packed
//! once per call (at most `8 x k` elements), and the column blocks go to rayon's threads.
//! Each element of `C` is one chain of fused multiply-adds over `k` in order, whatever `m`
//! is: a row computed alone equals the same row computed in a batch, bit for bit.
//!
//! AVX2 and FMA only, detected at run time; [`sgemm`] answers `false` where it does not apply
//! and the caller takes the general path.

/// Rows of `A` this path takes.
pub const MAX_M: usize = 8;
/// Elements of `B` from which this path takes a product (128 KB): below, `B` stays in cache
/// anyway and `gemm` is as fast.
pub const MIN_B: usize = 1 << 15;
/// Rows of `B` per block.
const KC: usize = 128;
/// Columns of `B` per block (and at most per rayon task).
const NC: usize = 256;
/// Distance between rows of the block's copy: `NC` plus one cache line, so that the rows
/// fall in different sets of the L1 cache when a strip walks down them.
const LD: usize = NC + 16;

/// `C := A B` for `m <= MAX_M`, `B` with contiguous rows (`b_cs == 1`) and `C` likewise
/// (`c_cs == 1`), when the CPU has AVX2 and FMA. Returns `false`, touching nothing, when it
/// does not apply.
///
/// # Safety
/// As [`crate::sgemm_strided`]'s.
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
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if m == 0
            || m > MAX_M
            || !enabled()
            || k == 0
            || n < 16
            || k.saturating_mul(n) < MIN_B
            || b_cs != 1
            || c_cs != 1
            || !std::is_x86_feature_detected!("avx2")
            || !std::is_x86_feature_detected!("fma")
        {
            return false;
        }
        // A packed as `ap[l * MAX_M + i] = A[i][l]`: the `m` values a row of `B` meets.
        let mut ap = vec![0.0f32; k * MAX_M];
        for l in 0..k {
            for i in 0..m {
                // SAFETY: element (i, l) of A, valid by the caller's contract.
                ap[l * MAX_M + i] = unsafe { *a.offset(i as isize * a_rs + l as isize * a_cs) };
            }
        }
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
        let ap = &ap;
        let one = |blk: usize| {
            let (b, c) = ptrs.get();
            let (j0, j1) = (blk * nc, ((blk + 1) * nc).min(n));
            PACKED.with(|packed| {
                let mut packed = packed.borrow_mut();
                packed.resize(KC * LD, 0.0);
                // SAFETY: AVX2 and FMA were detected above; the block's columns lie inside B
                // and C (the caller's contract), blocks write disjoint columns of C, and
                // `packed` is this thread's own.
                unsafe {
                    x86::block(
                        m,
                        k,
                        ap.as_ptr(),
                        b,
                        b_rs,
                        c,
                        c_rs,
                        j0,
                        j1,
                        n,
                        packed.as_mut_ptr(),
                    )
                };
            });
        };
        if blocks > 1 && threads > 1 {
            use rayon::prelude::*;
            (0..blocks).into_par_iter().for_each(one);
        } else {
            (0..blocks).for_each(one);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (
            m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, threaded,
        );
        false
    }
}

thread_local! {
    /// Each thread's copy of the block of `B` in use (`KC * LD` values, 136 KB).
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether this path is on: `PEFT_GEMM_SMALL_M=off` sends these products to `gemm` as well,
/// so that one binary can measure both; read once.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !std::env::var("PEFT_GEMM_SMALL_M").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
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

    use super::{KC, LD, MAX_M};

    /// Columns per strip: two vectors of 8, one cache line of the packed block per row.
    const WIDTH: usize = 16;
    /// Rows of `A` per pass over a packed block: 4 rows by 2 vectors is 8 accumulators, which
    /// leaves registers for the loads of `B` and the broadcasts of `A` (8 rows by 1 vector
    /// made the compiler spill an accumulator to the stack, a third of the rate).
    const ROWS: usize = 4;

    /// Columns `j0..j1` of `C := A B` (`n` columns in all), `A` packed (`ap`, see
    /// [`super::sgemm`]).
    ///
    /// Each block of `B` (at most `KC` rows of the columns) is first copied into `buf` row by
    /// row, rows [`LD`] values apart: walking down a strip of `B` itself meets rows that are
    /// far apart and often map to the same cache sets (a row of the LM head is 128 KB), while
    /// the copy's rows, one cache line more than `NC` apart, fall in different sets. The
    /// strips then walk down `buf`, once per group of [`ROWS`] rows of `A`. While they do, the
    /// next block is requested for L2, a line every few steps.
    ///
    /// Copying the strips one after the other instead (each strip's rows next to each other)
    /// scattered the copy's writes 8 KB apart, into the same L1 sets: the step's products
    /// took 15-22 ms, against 11.8-12.7 ms this way (`sgemm_bench -- decode`, medians).
    ///
    /// # Safety
    /// AVX2 and FMA present; `m <= MAX_M`; `ap` holds `k * MAX_M` values; rows `0..k` of `B`
    /// and `0..m` of `C` are valid at columns `j0..j1` (at most `NC`); `buf` holds `KC * LD`
    /// values.
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
        buf: *mut f32,
    ) {
        let count = (j1 - j0) / WIDTH;
        let full = count * WIDTH;
        let mut kb = 0;
        while kb < k {
            let ke = (kb + KC).min(k);
            let rows = ke - kb;
            // The block after this one: the next rows of these columns, or the first rows of
            // the next columns (the next block of this thread, unless it is another's).
            let (next_k, next_j) = if ke < k { (ke, j0) } else { (0, j1) };
            let next_cols = n.saturating_sub(next_j).min(j1 - j0);
            let next = Prefetch {
                at: b
                    .wrapping_offset(next_k as isize * b_rs)
                    .wrapping_add(next_j),
                b_rs,
                per_row: next_cols.div_ceil(16),
                left: (k - next_k).min(KC) * next_cols.div_ceil(16),
                row: 0,
                line: 0,
            };
            // SAFETY (the whole block): rows kb..ke of B and 0..m of C are valid at columns
            // j0..j1; buf holds KC * LD >= rows * LD values; ap holds k * MAX_M values.
            unsafe {
                for r in 0..rows {
                    let src = b.offset((kb + r) as isize * b_rs).add(j0);
                    std::ptr::copy_nonoverlapping(src, buf.add(r * LD), full);
                }
                let mut next = next;
                let mut i0 = 0;
                while i0 < m {
                    let part = Part {
                        ap: ap.add(kb * MAX_M + i0),
                        c: c.offset(i0 as isize * c_rs),
                        c_rs,
                        rows,
                        first: kb == 0,
                        passes: m.div_ceil(ROWS),
                    };
                    match m - i0 {
                        1 => strips::<1>(part, buf, j0, count, &mut next),
                        2 => strips::<2>(part, buf, j0, count, &mut next),
                        3 => strips::<3>(part, buf, j0, count, &mut next),
                        _ => strips::<ROWS>(part, buf, j0, count, &mut next),
                    }
                    i0 += ROWS;
                }
                // The last columns, one at a time from B: the same chain of fused
                // multiply-adds.
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

    /// The rows of `A` and `C` one pass over a packed block works on.
    #[derive(Clone, Copy)]
    struct Part {
        /// `A`, packed, at the block's first row of `B` and the pass's first row of `A`.
        ap: *const f32,
        /// `C` at the pass's first row.
        c: *mut f32,
        c_rs: isize,
        /// Rows of `B` in the block.
        rows: usize,
        /// Whether this is the first block of `k` (`C` starts from zero, not from itself).
        first: bool,
        /// Passes over the block (groups of [`ROWS`] rows of `A`): each asks for the next
        /// block's lines every `passes` steps, so that together they ask for all of them.
        passes: usize,
    }

    /// `M` rows of `C` (at most [`ROWS`]) over `count` strips of the packed block.
    ///
    /// # Safety
    /// As [`block`]'s, for the part's rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn strips<const M: usize>(
        part: Part,
        buf: *const f32,
        j0: usize,
        count: usize,
        next: &mut Prefetch,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            for s in 0..count {
                let j = j0 + s * WIDTH;
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                if !part.first {
                    for (i, row) in acc.iter_mut().enumerate() {
                        let out = part.c.offset(i as isize * part.c_rs).add(j);
                        *row = [_mm256_loadu_ps(out), _mm256_loadu_ps(out.add(8))];
                    }
                }
                let mut p = buf.add(s * WIDTH);
                let mut a = part.ap;
                for l in 0..part.rows {
                    if l % part.passes == 0 {
                        next.step();
                    }
                    let (b0, b1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*a.add(i));
                        row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                        row[1] = _mm256_fmadd_ps(x, b1, row[1]);
                    }
                    p = p.add(LD);
                    a = a.add(MAX_M);
                }
                for (i, row) in acc.iter().enumerate() {
                    let out = part.c.offset(i as isize * part.c_rs).add(j);
                    _mm256_storeu_ps(out, row[0]);
                    _mm256_storeu_ps(out.add(8), row[1]);
                }
            }
        }
    }
}
