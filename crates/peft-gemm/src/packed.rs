//! Products with at most [`MAX_M`] rows of `A` against a `B` packed once, in panels of
//! [`PANEL`] columns stored one after the other ([`PackedB`]): a decoding step's products,
//! whose time is reading the weights from memory.
//!
//! Read in place (`crate::small_m`), a strip of 16 columns of a row-major weight takes one
//! cache line from each of its rows, `4 n` bytes apart: every line is its own request, and
//! the hardware prefetchers, which follow sequential lines, do not help. Packed, a panel is
//! `k` lines one after the other and each thread reads its panels as one sequential stream,
//! with the lines 8 KB ahead requested for L2.
//!
//! Measured on the 2-core Xeon (AVX-512), 2 threads:
//! - the bench's LM head, `8 x 512 · 512 x 32128` (66 MB): 2.4 ms in place, 1.2-1.4 ms
//!   packed (48-53 GB/s) (`sgemm_bench -- decode`);
//! - the 73 products of a decoding step of the bench's mT5-small (154 MB), called from a
//!   worker of rayon's pool as `peft` does: 7.3-8.7 ms in place, 4.7-4.9 ms packed (median
//!   of 40 sweeps), 4.4-4.6 ms with two panels at a time (below);
//! - for scale, a plain sum over 154 MB in 2 MB pages: 3.5-4.4 ms.
//!
//! With AVX-512 and at most 12 rows, a thread takes its panels two at a time: one broadcast
//! of `A` then serves two vectors of `B`, which halves the loads per fused multiply-add
//! (the 72 small products of a step from L2 on one thread: 1.97 -> 1.65 ms). Each stream
//! requests its lines one pair of panels ahead.
//!
//! Each element of `C` is the same chain of fused multiply-adds over `k` in order as in
//! `crate::small_m`, so the two paths give the same values, bit for bit, and a row alone
//! equals the same row in a batch of up to [`MAX_M`].

use crate::small_m::MAX_M;

/// Columns per panel: one AVX-512 vector, one cache line of a panel's row.
pub const PANEL: usize = 16;
/// Floats ahead of the one being read whose line is requested for L2 (8 KB).
const AHEAD: usize = 2048;

/// A `k x n` matrix `B` stored for [`sgemm_packed`]: panel `p` holds columns
/// `16 p .. 16 p + 16` of every row, row after row (`16 k` floats), the columns past `n`
/// of the last panel zero.
#[derive(Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedB")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl PackedB {
    /// The bytes a packed `k x n` matrix takes (its last panel padded to [`PANEL`]
    /// columns); `None` when that overflows `usize`.
    pub fn bytes_for(k: usize, n: usize) -> Option<usize> {
        n.div_ceil(PANEL)
            .checked_mul(PANEL)?
            .checked_mul(k)?
            .checked_mul(std::mem::size_of::<f32>())
    }

    /// Packs the `k x n` matrix whose element `(l, j)` is at `b.offset(l * b_rs + j * b_cs)`,
    /// panels on rayon's threads. `None`, with nothing kept, when the memory for it
    /// ([`PackedB::bytes_for`]) cannot be had: the caller goes on with `B` in place.
    ///
    /// # Safety
    /// For `l < k`, `j < n`, `b.offset(l * b_rs + j * b_cs)` must be valid for reads.
    pub unsafe fn pack(
        k: usize,
        n: usize,
        b: *const f32,
        b_rs: isize,
        b_cs: isize,
    ) -> Option<Self> {
        use rayon::prelude::*;
        let len = Self::bytes_for(k, n)? / std::mem::size_of::<f32>();
        let mut data: Vec<f32> = Vec::new();
        data.try_reserve_exact(len).ok()?;
        let src = Src(b);
        // Each task packs a run of panels, `ROWS` rows of `B` at a time: it reads those rows'
        // columns of its panels in order (a few sequential streams) and writes each panel's
        // `ROWS x 16` values as one contiguous piece. Every element is written once, padding
        // included, into memory not zeroed first (its pages are touched by the tasks, in
        // parallel). Panel by panel, reading one line from each of `k` rows, it packed
        // mt0-large's weights at 0.4 GB/s.
        const PANELS_PER_TASK: usize = 64;
        const ROWS: usize = 16;
        let task = PANEL * k * PANELS_PER_TASK;
        if len > 0 {
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(task)
                .enumerate()
                .for_each(|(t, chunk)| {
                    let b = src.get();
                    let p0 = t * PANELS_PER_TASK;
                    for l0 in (0..k).step_by(ROWS) {
                        let l1 = (l0 + ROWS).min(k);
                        for (pi, panel) in chunk.chunks_mut(PANEL * k).enumerate() {
                            let j0 = (p0 + pi) * PANEL;
                            let cols = (n - j0).min(PANEL);
                            for l in l0..l1 {
                                let row = &mut panel[l * PANEL..(l + 1) * PANEL];
                                for (jj, out) in row.iter_mut().enumerate() {
                                    let v = if jj < cols {
                                        // SAFETY: l < k and j0 + jj < n: inside B (the
                                        // caller's contract).
                                        unsafe {
                                            *b.offset(l as isize * b_rs + (j0 + jj) as isize * b_cs)
                                        }
                                    } else {
                                        0.0
                                    };
                                    out.write(v);
                                }
                            }
                        }
                    }
                });
            // SAFETY: the tasks cover all `len` elements (every panel's `k` rows of 16), each
            // written above.
            unsafe { data.set_len(len) };
        }
        Some(PackedB { k, n, data })
    }

    /// Rows of `B`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}

/// `B` shared with the packing tasks (only read).
#[derive(Clone, Copy)]
struct Src(*const f32);
// SAFETY: only read through, while `pack`'s caller keeps `B` alive.
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

impl Src {
    /// A method, so that closures capture the `Sync` wrapper and not the raw pointer.
    fn get(&self) -> *const f32 {
        self.0
    }
}

/// `C` shared between the tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: each task writes a disjoint set of columns of `C`, alive for the call.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// A method, so that closures capture the `Sync` wrapper and not the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Whether [`sgemm_packed`] runs on this CPU (x86-64 with AVX2 and FMA): where it does not,
/// packing would only cost memory.
pub fn packed_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C := A B` for `m <= MAX_M` with `B` packed, when the CPU has AVX2 and FMA (AVX-512F
/// where `wide`): the panels split into one contiguous run per thread (with `threaded`).
/// Returns `false`, touching nothing, when it does not apply (too many rows, no AVX2, `C`'s
/// columns not contiguous); the caller then multiplies `B` in place.
///
/// # Safety
/// For `i < m`, `l < b.k()`, `j < b.n()`: `a.offset(i * a_rs + l * a_cs)` valid for reads,
/// `c.offset(i * c_rs + j)` valid for writes, and `C` not overlapping `A`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_packed(
    m: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: &PackedB,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    threaded: bool,
) -> bool {
    // SAFETY: the caller's contract; `wide()` is true only where the CPU has AVX-512F.
    unsafe {
        sgemm_packed_with(
            m,
            a,
            a_rs,
            a_cs,
            b,
            c,
            c_rs,
            c_cs,
            threaded,
            crate::small_m::wide(),
        )
    }
}

/// [`sgemm_packed`] with the AVX-512 panels (`wide`) or the AVX2 ones.
///
/// # Safety
/// As [`sgemm_packed`]'s; `wide` only where the CPU has AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_packed_with(
    m: usize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: &PackedB,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    threaded: bool,
    wide: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let (k, n) = (b.k, b.n);
        if m == 0 || m > MAX_M || c_cs != 1 || !packed_supported() {
            return false;
        }
        if n == 0 {
            return true;
        }
        if k == 0 {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: C is m x n at these strides (the caller's contract).
                    unsafe { *c.offset(i as isize * c_rs).add(j) = 0.0 };
                }
            }
            return true;
        }
        let body = |ap: &[f32]| {
            let panels = n.div_ceil(PANEL);
            let threads = if threaded {
                rayon::current_num_threads().clamp(1, panels)
            } else {
                1
            };
            let per = panels.div_ceil(threads);
            let dst = Dst(c);
            let data = &b.data;
            let run = |t: usize| {
                let c = dst.get();
                let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
                // The first lines of this run at once: the kernels request the lines `AHEAD`
                // floats on from the one they read, so nothing before that would be requested.
                let run_start = data.as_ptr().wrapping_add(p0 * PANEL * k);
                let run_len = (p1.saturating_sub(p0) * PANEL * k).min(AHEAD);
                for off in (0..run_len).step_by(PANEL) {
                    // SAFETY: a prefetch is a hint: it cannot fault and reads nothing.
                    unsafe {
                        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                        _mm_prefetch::<_MM_HINT_T1>(run_start.wrapping_add(off) as *const i8);
                    }
                }
                let mut p = p0;
                while p < p1 {
                    let pair = wide && m <= x86::PAIR_M && p + 1 < p1;
                    let last = if pair { p + 1 } else { p };
                    let cols = (n - last * PANEL).min(PANEL);
                    // SAFETY: AVX2 and FMA (and AVX-512F with `wide`) were detected; panels `p`
                    // (and `p + 1` for a pair) hold `16 k` floats each of `data`; their columns
                    // of C are valid and this task's.
                    unsafe {
                        let bp = data.as_ptr().add(p * PANEL * k);
                        let cp = c.add(p * PANEL);
                        if pair {
                            x86::pair_wide(m, k, ap.as_ptr(), bp, cp, c_rs, cols);
                        } else if wide {
                            x86::panel_wide(m, k, ap.as_ptr(), bp, cp, c_rs, cols);
                        } else {
                            x86::panel(m, k, ap.as_ptr(), bp, cp, c_rs, cols);
                        }
                    }
                    p = last + 1;
                }
            };
            if threads > 1 {
                use rayon::prelude::*;
                (0..threads).into_par_iter().for_each(run);
            } else {
                run(0);
            }
        };
        // SAFETY: A is m x k at these strides (the caller's contract).
        unsafe { crate::small_m::with_packed_a(m, k, a, a_rs, a_cs, body) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, a, a_rs, a_cs, b, c, c_rs, c_cs, threaded, wide);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{AHEAD, MAX_M, PANEL};

    /// Rows of `A` an AVX2 pass keeps in registers (8 accumulators of its 16 registers).
    const NARROW_M: usize = 8;
    /// Columns of an AVX2 half-panel: one 256-bit vector.
    const HALF: usize = 8;

    /// One panel (`cols <= 16` valid columns) for the `m` rows of `A` in AVX-512 registers.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA present; `ap` holds `k * MAX_M` floats, `bp` the panel's
    /// `16 k`; rows `0..m` of `C` are valid at its first `cols` columns from `c`.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn panel_wide(
        m: usize,
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        cols: usize,
    ) {
        // SAFETY: forwarded.
        unsafe {
            by_rows!(
                panel_wide_m,
                m,
                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                MAX_M,
                (k, ap, bp, c, c_rs, cols)
            )
        }
    }

    /// [`panel_wide`] with `M` accumulators.
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn panel_wide_m<const M: usize>(
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        cols: usize,
    ) {
        // SAFETY: the caller's contract; prefetches are hints that cannot fault, and their
        // addresses are formed with wrapping arithmetic.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); M];
            let mut p = bp;
            let mut a = ap;
            for _ in 0..k {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD) as *const i8);
                let bv = _mm512_loadu_ps(p);
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i)), bv, *row);
                }
                p = p.add(PANEL);
                a = a.add(MAX_M);
            }
            let mask = cols_mask(cols);
            for (i, row) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(c.offset(i as isize * c_rs), mask, *row);
            }
        }
    }

    /// The store mask of a panel with `cols` valid columns (all 16 from `PANEL` on).
    fn cols_mask(cols: usize) -> __mmask16 {
        if cols >= PANEL {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }

    /// Rows of `A` up to which [`pair_wide`] takes two panels at a time (2 x 12 accumulators,
    /// two vectors of `B` and a broadcast in the 32 AVX-512 registers).
    pub(super) const PAIR_M: usize = 12;

    /// Two consecutive panels (the first full, the second with `cols` valid columns) for the
    /// `m <= PAIR_M` rows of `A`: one broadcast of `A` serves two vectors of `B`, so a step
    /// takes 2 loads of `B` and `m` broadcasts for `2 m` fused multiply-adds instead of 1
    /// and `m` for `m`. The same chain per element as [`panel_wide`].
    ///
    /// # Safety
    /// As [`panel_wide`]'s for both panels (`bp` the first's; the second follows it).
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn pair_wide(
        m: usize,
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        cols: usize,
    ) {
        // SAFETY: forwarded.
        unsafe {
            by_rows!(
                pair_wide_m,
                m,
                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                PAIR_M,
                (k, ap, bp, c, c_rs, cols)
            )
        }
    }

    /// [`pair_wide`] with `2 M` accumulators.
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn pair_wide_m<const M: usize>(
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        cols: usize,
    ) {
        // SAFETY: as in `panel_wide_m`.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); M];
            let mut hi = [_mm512_setzero_ps(); M];
            let mut p = bp;
            let mut q = bp.add(PANEL * k);
            let mut a = ap;
            let ahead = 2 * PANEL * k;
            for _ in 0..k {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(ahead) as *const i8);
                let (b0, b1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(q));
                for i in 0..M {
                    let ai = _mm512_set1_ps(*a.add(i));
                    lo[i] = _mm512_fmadd_ps(ai, b0, lo[i]);
                    hi[i] = _mm512_fmadd_ps(ai, b1, hi[i]);
                }
                p = p.add(PANEL);
                q = q.add(PANEL);
                a = a.add(MAX_M);
            }
            let mask = cols_mask(cols);
            for i in 0..M {
                let row = c.offset(i as isize * c_rs);
                _mm512_storeu_ps(row, lo[i]);
                _mm512_mask_storeu_ps(row.add(PANEL), mask, hi[i]);
            }
        }
    }

    /// One panel in AVX2 registers: each half of 8 columns in passes of at most 8 rows,
    /// reading the panel again (from L1/L2) for the next half and the next rows.
    ///
    /// # Safety
    /// As [`panel_wide`]'s, without AVX-512F.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel(
        m: usize,
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        cols: usize,
    ) {
        for half in 0..PANEL / HALF {
            let j = half * HALF;
            if j >= cols {
                break;
            }
            let w = (cols - j).min(HALF);
            for i0 in (0..m).step_by(NARROW_M) {
                let rows = (m - i0).min(NARROW_M);
                // SAFETY: forwarded; rows i0.. of A's packing and C, columns j.. of the panel.
                unsafe {
                    let (a, b, c) = (ap.add(i0), bp.add(j), c.offset(i0 as isize * c_rs).add(j));
                    by_rows!(
                        half_m,
                        rows,
                        [1, 2, 3, 4, 5, 6, 7],
                        NARROW_M,
                        (k, a, b, c, c_rs, w)
                    )
                }
            }
        }
    }

    /// 8 columns (`w` of them valid) of one panel for `M <= 8` rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half_m<const M: usize>(
        k: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        c_rs: isize,
        w: usize,
    ) {
        // SAFETY: the caller's contract; prefetches as in `panel_wide_m`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); M];
            let mut p = bp;
            let mut a = ap;
            for _ in 0..k {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD) as *const i8);
                let bv = _mm256_loadu_ps(p);
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = _mm256_fmadd_ps(_mm256_broadcast_ss(&*a.add(i)), bv, *row);
                }
                p = p.add(PANEL);
                a = a.add(MAX_M);
            }
            for (i, row) in acc.iter().enumerate() {
                let out = c.offset(i as isize * c_rs);
                if w == HALF {
                    _mm256_storeu_ps(out, *row);
                } else {
                    let mut tmp = [0.0f32; HALF];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *row);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, w);
                }
            }
        }
    }
}
