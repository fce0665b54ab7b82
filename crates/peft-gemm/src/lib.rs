//! The CBLAS symbols that ndarray's `blas` feature calls, implemented in pure Rust.
//!
//! # Why this crate exists
//!
//! burn-ndarray (the CPU backend of Burn) multiplies matrices with
//! `ndarray::linalg::general_mat_mul`. Without ndarray's `blas` feature that is
//! `matrixmultiply`, which on the machines this project runs on reaches about half of
//! what the `gemm` crate reaches (see `shared/notes/cpu-gemm.md`). With the `blas`
//! feature, ndarray 0.17 calls `cblas_sgemm` (through the `cblas-sys` bindings, which
//! declare the functions but link no library) whenever a dimension is larger than 7 and
//! the three operands have BLAS-compatible strides (transposed views do).
//!
//! Instead of a system BLAS (a C library to install, and one more thread pool), this crate
//! defines those symbols itself, as `#[unsafe(no_mangle)] extern "C"` functions:
//!
//! | symbol | implemented with |
//! |---|---|
//! | `cblas_sgemm`, `cblas_dgemm` | `gemm::gemm` (f32 / f64 kernels, rayon for large products) |
//! | `cblas_cgemm`, `cblas_zgemm` | `gemm::gemm` with `c32` / `c64` (conjugation supported) |
//! | `cblas_sgemv`, `cblas_dgemv` | `gemm::gemm` with one column, any increments |
//! | `cblas_sdot`, `cblas_ddot` | a plain loop |
//!
//! These are all the symbols that ndarray 0.17 references (`src/linalg/impl_linalg.rs`):
//! the gemm family from `general_mat_mul` and `dot` of two matrices, the gemv pair from
//! `general_mat_vec_mul` and matrix-vector `dot`, and the dot pair from vector `dot`.
//! An unoptimised build (opt-level 0) references all four gemm symbols from a single
//! `f32` matrix product, since ndarray's type dispatch is not folded away there, so all
//! of them must exist for such a binary to link.
//!
//! Semantics follow the reference CBLAS: `C := alpha*op(A)*op(B) + beta*C`, with
//! `CblasRowMajor = 101`, `CblasColMajor = 102`, `CblasNoTrans = 111`,
//! `CblasTrans = 112`, `CblasConjTrans = 113`. When `beta` is zero, `C` is not read (it may
//! hold NaN or be uninitialised); when `alpha` is zero or `k` is zero, `A` and `B` are not
//! read. Invalid arguments (a negative dimension, an unknown layout or transpose code, a
//! leading dimension smaller than the reference BLAS allows, a zero increment) make the
//! call return without touching any output: the reference BLAS would print an error
//! through `xerbla`; this crate never prints, never panics, and sets nothing global (no
//! allocator, no thread pool of its own, none of gemm's tuning knobs).
//!
//! Threads come from rayon's global pool (`gemm::Parallelism::Rayon`, with
//! `rayon::current_num_threads()` threads, so `RAYON_NUM_THREADS` governs them, and a
//! call made from inside a rayon pool uses that pool). Products under
//! [`PARALLEL_THRESHOLD`] multiply-adds run on the calling thread, with no rayon
//! hand-off at all. [`sgemm_strided`] cuts a threaded product of at most [`SPLIT_MAX_M`] rows
//! into one block of columns per thread, each a single-threaded `gemm` call, where that sums
//! every element as the whole product would ([`column_split`]).
//!
//! Small-M products (decoding: `8 x 512 · 512 x 32128`) go to `gemm` as well. With a
//! row-major `B` it streams `B` without packing it; with a transposed `B` it packs it
//! block by block through an L2-sized buffer, never all of `B` at once. faer was measured
//! as an alternative for small M and left out: no faster on that shape on the 2-core
//! AVX2 machine (19 against 22 GFLOP/s single-threaded, measured while the machine was
//! busy), slower on large products, and it multiplied the release build time of this
//! crate by about 4.7 (31 s to 145 s).
//!
//! # Features
//!
//! - `avx512` (default): gemm's AVX-512 kernels (`gemm/x86-v4`), chosen at run time
//!   only on CPUs that have AVX-512, AVX2/FMA kernels otherwise. The 240 GFLOP/s of
//!   `shared/notes/cpu-gemm.md` for gemm on one AVX-512 core are twice what an AVX2
//!   kernel reached there (OpenBLAS pinned to Haswell: 120), so they need it. It adds
//!   about 20 s to a release build of this crate.
//! - `call-counter`: `call_counts()` (one relaxed atomic add per call), for tests that must
//!   prove ndarray took the BLAS path.
//! - `ndarray-blas`: turns on ndarray 0.17's `blas` feature (see below).
//!
//! # How a crate picks it up
//!
//! Two things are needed: the dependency with the `use` that makes rustc link this crate,
//! and ndarray's `blas` feature (this crate's `ndarray-blas` feature turns it on):
//!
//! ```toml
//! # workspace Cargo.toml, [workspace.dependencies]
//! peft-gemm = { path = "crates/peft-gemm", version = "0.1.0" }
//!
//! # the crate's Cargo.toml, [dependencies]
//! peft-gemm = { workspace = true, features = ["ndarray-blas"] }
//! ```
//!
//! ```rust,ignore
//! // the crate's root (lib.rs or main.rs)
//! use peft_gemm as _;
//! ```
//!
//! `ndarray-blas` is the same as a direct `ndarray = { version = "0.17",
//! default-features = false, features = ["blas"] }` dependency: Cargo unifies features, so
//! the copy of ndarray 0.17 that burn-ndarray uses gets `blas` too. The `use` line is what
//! makes rustc link this crate: a dependency that no code names is never loaded, so it
//! never reaches the linker, and a binary that contains a call into ndarray's BLAS path
//! then fails to link with `undefined symbol: cblas_sgemm` (loudly, never silently).
//!
//! One `use` in a library crate is enough for everything built on it: rustc loads the
//! whole crate graph recorded in a library's metadata, so the library's unit tests, its
//! integration tests and examples, and every crate downstream of it link this crate too.
//!
//! Link order does not matter. rustc puts a crate's rlib before its dependencies on the
//! linker's command line, and this crate and ndarray do not depend on each other, so this
//! crate may well come first (it does with a typical dependency graph). A classic linker
//! would then not go back to it for the `cblas_sgemm` that ndarray's code needs. But
//! when rustc links an executable it also writes a small `symbols.o`, placed first, that
//! references every `#[no_mangle]` symbol exported by the linked rlibs, so the eight
//! functions are pulled in before any rlib is read; and the default linker of the
//! `x86_64-unknown-linux-gnu` target since Rust 1.90 (the bundled LLD) ignores archive
//! order anyway. Both were checked with rustc 1.95, with LLD and with GNU ld 2.40
//! (`-C linker-features=-lld`), on an rlib ordered before ndarray's.
//!
//! ## In a workspace
//!
//! Cargo unifies features over everything one command builds, dev-dependencies of the
//! selected packages included. So once any crate of a `cargo test --workspace` (or
//! `cargo build --workspace`) turns `blas` on, ndarray has it in every crate of that
//! build, and each binary of that build whose code reaches ndarray's matrix product must
//! link this crate or fail to link (binaries whose code never reaches the product, after
//! `--gc-sections`, link fine). The safe arrangement: the lowest crate of the workspace,
//! the one that every user of the NdArray backend depends on (here `peft-core`), takes
//! the dependency with `ndarray-blas` and the `use` line, unconditionally; every binary
//! that could multiply matrices then links the shim. That is also why this crate's own
//! end-to-end test through ndarray sits behind features rather than a dev-dependency:
//! `cargo test -p peft-gemm --features ndarray-blas,call-counter`.
//!
//! Do not also link a second BLAS (`blas-src`, `openblas-src`): that would be two
//! definitions of `cblas_sgemm` in one binary.

use core::ffi::{c_double, c_float, c_int, c_void};
use core::ops::Mul;

use gemm::{Parallelism, c32, c64};

/// `CblasRowMajor`.
pub const CBLAS_ROW_MAJOR: c_int = 101;
/// `CblasColMajor`.
pub const CBLAS_COL_MAJOR: c_int = 102;
/// `CblasNoTrans`.
pub const CBLAS_NO_TRANS: c_int = 111;
/// `CblasTrans`.
pub const CBLAS_TRANS: c_int = 112;
/// `CblasConjTrans`.
pub const CBLAS_CONJ_TRANS: c_int = 113;

/// Products with fewer multiply-adds (`m * n * k`) than this run on the calling thread.
///
/// Measured with `examples/sgemm_bench.rs -- threshold` on the 2-core machine (square
/// products, `gemm` with one thread against two): two threads lost below about 112³ even
/// in their best runs (the hand-off to a rayon worker likely costs as much as the product),
/// and won from 128³ up whenever the second core was free (best 129 against 93 GFLOP/s at
/// 128³, 148 against 96 at 192³).
pub const PARALLEL_THRESHOLD: u64 = 128 * 128 * 128;

/// ndarray 0.17's `GEMM_BLAS_CUTOFF`: its `general_mat_mul` calls BLAS only when one of
/// `m`, `n`, `k` is larger than this, and matrixmultiply otherwise.
pub const NDARRAY_BLAS_CUTOFF: usize = 7;

/// `$f::<N>(args)` for the `N` in the list that `$m` equals, `$f::<$last>(args)` otherwise
/// (the arguments given in parentheses):
/// a kernel with exactly as many accumulators as rows of `A` (the decoding kernels).
macro_rules! by_rows {
    ($f:ident, $m:expr, [$($n:literal),*], $last:expr, $args:tt) => {
        match $m {
            $($n => $f::<$n> $args,)*
            _ => $f::<$last> $args,
        }
    };
}

mod packed;
mod small_m;

pub use packed::{PANEL, PackedB, packed_supported, sgemm_packed};
pub use small_m::MAX_M as SMALL_M;

#[cfg(feature = "call-counter")]
mod counter {
    use core::sync::atomic::{AtomicU64, Ordering};

    pub(crate) static SGEMM: AtomicU64 = AtomicU64::new(0);
    pub(crate) static DGEMM: AtomicU64 = AtomicU64::new(0);
    pub(crate) static CGEMM: AtomicU64 = AtomicU64::new(0);
    pub(crate) static ZGEMM: AtomicU64 = AtomicU64::new(0);
    pub(crate) static SGEMV: AtomicU64 = AtomicU64::new(0);
    pub(crate) static DGEMV: AtomicU64 = AtomicU64::new(0);
    pub(crate) static SDOT: AtomicU64 = AtomicU64::new(0);
    pub(crate) static DDOT: AtomicU64 = AtomicU64::new(0);

    #[inline]
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often each exported function has been called in this process (only with the
/// `call-counter` feature, which exists for tests that must prove ndarray took the BLAS
/// path; it costs one relaxed atomic add per call).
#[cfg(feature = "call-counter")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub sgemm: u64,
    pub dgemm: u64,
    pub cgemm: u64,
    pub zgemm: u64,
    pub sgemv: u64,
    pub dgemv: u64,
    pub sdot: u64,
    pub ddot: u64,
}

/// The current [`CallCounts`].
#[cfg(feature = "call-counter")]
pub fn call_counts() -> CallCounts {
    use core::sync::atomic::Ordering::Relaxed;
    CallCounts {
        sgemm: counter::SGEMM.load(Relaxed),
        dgemm: counter::DGEMM.load(Relaxed),
        cgemm: counter::CGEMM.load(Relaxed),
        zgemm: counter::ZGEMM.load(Relaxed),
        sgemv: counter::SGEMV.load(Relaxed),
        dgemv: counter::DGEMV.load(Relaxed),
        sdot: counter::SDOT.load(Relaxed),
        ddot: counter::DDOT.load(Relaxed),
    }
}

macro_rules! count {
    ($name:ident) => {
        #[cfg(feature = "call-counter")]
        counter::bump(&counter::$name);
    };
}

/// The element types `gemm::gemm` accepts that CBLAS uses.
trait Scalar: Copy + PartialEq + Mul<Output = Self> + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    const COMPLEX: bool;
    /// `f32` (the only type the reference-kernel switch applies to).
    const F32: bool = false;
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const COMPLEX: bool = false;
    const F32: bool = true;
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const COMPLEX: bool = false;
}

impl Scalar for c32 {
    const ZERO: Self = c32 { re: 0.0, im: 0.0 };
    const ONE: Self = c32 { re: 1.0, im: 0.0 };
    const COMPLEX: bool = true;
}

impl Scalar for c64 {
    const ZERO: Self = c64 { re: 0.0, im: 0.0 };
    const ONE: Self = c64 { re: 1.0, im: 0.0 };
    const COMPLEX: bool = true;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Trans {
    No,
    Yes,
    Conj,
}

fn layout_is_row_major(layout: c_int) -> Option<bool> {
    match layout {
        CBLAS_ROW_MAJOR => Some(true),
        CBLAS_COL_MAJOR => Some(false),
        _ => None,
    }
}

fn parse_trans(trans: c_int) -> Option<Trans> {
    match trans {
        CBLAS_NO_TRANS => Some(Trans::No),
        CBLAS_TRANS => Some(Trans::Yes),
        CBLAS_CONJ_TRANS => Some(Trans::Conj),
        _ => None,
    }
}

/// Row and column strides of `op(X)` for a matrix stored with leading dimension `ld`.
///
/// Row-major storage without transposition, and column-major storage with it, both put
/// consecutive columns of `op(X)` next to each other.
fn op_strides(row_major: bool, trans: Trans, ld: c_int) -> (isize, isize) {
    let ld = ld as isize;
    if row_major == (trans == Trans::No) {
        (ld, 1)
    } else {
        (1, ld)
    }
}

/// Rayon for large products, the calling thread for small ones.
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let work = (m as u64).saturating_mul(n as u64).saturating_mul(k as u64);
    if work < PARALLEL_THRESHOLD {
        return Parallelism::None;
    }
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// `C := beta * C` over an `m x n` block (`beta == 0` writes zeros without reading).
///
/// # Safety
/// Every `c[i * rs + j * cs]` for `i < m`, `j < n` must be valid for writes (and reads
/// unless `beta` is zero).
unsafe fn scale<T: Scalar>(m: usize, n: usize, beta: T, c: *mut T, rs: isize, cs: isize) {
    if beta == T::ONE {
        return;
    }
    for i in 0..m {
        for j in 0..n {
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let p = c.offset(i as isize * rs + j as isize * cs);
                *p = if beta == T::ZERO { T::ZERO } else { beta * *p };
            }
        }
    }
}

/// `C := alpha * op(A) * op(B) + beta * C` with reference-BLAS argument checks.
///
/// # Safety
/// The CBLAS contract: the pointers cover the matrices their dimensions and leading
/// dimensions describe.
/// `PEFT_GEMM_KERNEL=matrixmultiply` routes `sgemm` to matrixmultiply, the kernel ndarray
/// uses without BLAS, so that one binary can measure both (`cargo xtask bench`); read once.
fn reference_kernel() -> bool {
    static REFERENCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REFERENCE.get_or_init(|| {
        std::env::var("PEFT_GEMM_KERNEL").is_ok_and(|v| v.eq_ignore_ascii_case("matrixmultiply"))
    })
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl<T: Scalar>(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: T,
    a: *const T,
    lda: c_int,
    b: *const T,
    ldb: c_int,
    beta: T,
    c: *mut T,
    ldc: c_int,
) {
    let (Some(row_major), Some(ta), Some(tb)) = (
        layout_is_row_major(layout),
        parse_trans(transa),
        parse_trans(transb),
    ) else {
        return;
    };
    if m < 0 || n < 0 || k < 0 {
        return;
    }
    // The stored extent along the contiguous axis, which the leading dimension must cover.
    let contiguous = |rows: c_int, cols: c_int, trans: Trans| -> c_int {
        let (rows, cols) = if trans == Trans::No {
            (rows, cols)
        } else {
            (cols, rows)
        };
        if row_major { cols } else { rows }
    };
    if lda < contiguous(m, k, ta).max(1)
        || ldb < contiguous(k, n, tb).max(1)
        || ldc < contiguous(m, n, Trans::No).max(1)
    {
        return;
    }
    let (m, n, k) = (m as usize, n as usize, k as usize);
    if m == 0 || n == 0 {
        return;
    }
    let (c_rs, c_cs) = op_strides(row_major, Trans::No, ldc);
    if alpha == T::ZERO || k == 0 {
        // SAFETY: C is m x n with these strides (checked above).
        unsafe { scale(m, n, beta, c, c_rs, c_cs) };
        return;
    }
    let (a_rs, a_cs) = op_strides(row_major, ta, lda);
    let (b_rs, b_cs) = op_strides(row_major, tb, ldb);
    if T::F32 && reference_kernel() {
        // SAFETY: as below; T is f32 (checked by `T::F32`), so the casts are identities.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                *(&alpha as *const T as *const f32),
                a as *const f32,
                a_rs,
                a_cs,
                b as *const f32,
                b_rs,
                b_cs,
                *(&beta as *const T as *const f32),
                c as *mut f32,
                c_rs,
                c_cs,
            );
        }
        return;
    }
    // SAFETY: the operands are valid per the CBLAS contract and the checks above; gemm's
    // `alpha`/`beta` are BLAS's `beta`/`alpha` (it computes dst = alpha*dst + beta*lhs*rhs),
    // and with `read_dst == false` it writes dst without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            beta != T::ZERO,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            T::COMPLEX && ta == Trans::Conj,
            T::COMPLEX && tb == Trans::Conj,
            parallelism(m, n, k),
        );
    }
}

/// Whether [`sgemm_strided`] multiplies an `m x k · k x n` product whose `B` has column
/// stride `b_cs` (and a `C` with contiguous rows) with the decoding kernel, whose values
/// [`sgemm_packed`] reproduces bit for bit: at most [`SMALL_M`] rows, a row-major `B` of at
/// least 16 columns and 32768 elements (smaller ones stay in cache, and go to `gemm`), an
/// x86-64 CPU with AVX2 and FMA, and neither `PEFT_GEMM_SMALL_M=off` nor
/// `PEFT_GEMM_KERNEL=matrixmultiply`. These are the products worth packing `B` for.
pub fn packed_matches_in_place(m: usize, n: usize, k: usize, b_cs: isize) -> bool {
    // `takes` asks for 16 columns or more, so matrixmultiply's tiny products never apply.
    !reference_kernel() && small_m::takes(m, n, k, b_cs)
}

/// How [`sgemm_strided`] sums each element of an `m x k · k x n` product of a row-major `A`
/// and `B` into a row-major `C`: `Some(kc)` when every element is the sum of chains over
/// consecutive blocks of `kc` depths (the last one shorter), each block one chain of fused
/// multiply-adds in order from zero, the blocks' chains added in order (`((c1 + c2) + c3)`,
/// one block when `kc >= k`); `None` where it takes a path that sums otherwise (matrixmultiply
/// for tiny products, `gemm`'s matrix-vector and `k <= 2` paths, a CPU without FMA).
///
/// This lets a kernel that computes a product inside a larger pass (peft-core's unmerged
/// LoRA adapter, `ops::lora_add`) give the values the product alone gives.
/// The decoding kernel sums in one chain; `gemm` in blocks of the depth its
/// `kernel_params` choose (`k.min(512)` for products of at most 64 x 64 outputs).
pub fn depth_block(m: usize, n: usize, k: usize) -> Option<usize> {
    if m == 0 || n == 0 || k == 0 || reference_kernel() {
        return None;
    }
    if m <= NDARRAY_BLAS_CUTOFF && n <= NDARRAY_BLAS_CUTOFF && k <= NDARRAY_BLAS_CUTOFF {
        return None;
    }
    if small_m::takes(m, n, k, 1) {
        return Some(k);
    }
    // gemm computes a row-major `C = A B` as `Cᵀ = Bᵀ Aᵀ`: `n x m` outputs.
    let (gm, gn) = (n, m);
    if k <= 2 || gm <= 1 || gn <= 1 {
        return None;
    }
    if gm <= 64 && gn <= 64 {
        return Some(k.min(512));
    }
    let (mr, nr) = gemm_kernel_shape()?;
    Some(gemm_common::cache::kernel_params(gm, gn, k, mr, nr, std::mem::size_of::<f32>()).kc)
}

/// The output tile (`MR x NR`) of the `f32` kernels `gemm` runs on this CPU: AVX-512 where
/// built in and present, else AVX2 with FMA; `None` without FMA.
fn gemm_kernel_shape() -> Option<(usize, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::is_x86_feature_detected!("avx512f") {
            use gemm_f32::microkernel::avx512f::f32 as k;
            return Some((k::MR_DIV_N * 16, k::NR));
        }
        if std::is_x86_feature_detected!("fma") {
            use gemm_f32::microkernel::fma::f32 as k;
            return Some((k::MR_DIV_N * 8, k::NR));
        }
    }
    None
}

/// `C := A B` in f32, for matrices given by a pointer to their element `(0, 0)` and the
/// distance in elements between rows (`*_rs`) and between columns (`*_cs`): row-major,
/// column-major and transposed views alike, with no leading-dimension rules and no copy of
/// either operand. Every element of the `m x n` matrix `C` is written and none is read, so
/// `C` may hold NaN or be uninitialised; with `k == 0` it is filled with zeros.
///
/// `threaded`: whether a product of at least [`PARALLEL_THRESHOLD`] multiply-adds may use
/// rayon's pool. Pass `false` from inside a parallel loop over many products (the batched
/// products of attention), so that the threads are not asked twice.
///
/// Products whose three dimensions are all at most [`NDARRAY_BLAS_CUTOFF`] go to
/// matrixmultiply, as ndarray's `general_mat_mul` sends them there rather than to
/// `cblas_sgemm`: the two kernels sum in different orders, and this way a product through
/// this function equals one through ndarray (burn-ndarray's) bit for bit at every size.
/// `PEFT_GEMM_KERNEL=matrixmultiply` routes every call to matrixmultiply, as it does
/// `cblas_sgemm`.
///
/// # Safety
/// For `i < m`, `j < n`, `l < k`: `a.offset(i * a_rs + l * a_cs)` and
/// `b.offset(l * b_rs + j * b_cs)` must be valid for reads, `c.offset(i * c_rs + j * c_cs)`
/// valid for writes, those of `C` pairwise distinct, and `C` must not overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_strided(
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
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: C is m x n with these strides, valid for writes (the caller's contract).
        unsafe { scale(m, n, 0.0f32, c, c_rs, c_cs) };
        return;
    }
    if reference_kernel()
        || (m <= NDARRAY_BLAS_CUTOFF && n <= NDARRAY_BLAS_CUTOFF && k <= NDARRAY_BLAS_CUTOFF)
    {
        // SAFETY: the caller's contract; matrixmultiply does not read C when beta is 0.
        unsafe {
            matrixmultiply::sgemm(
                m, k, n, 1.0, a, a_rs, a_cs, b, b_rs, b_cs, 0.0, c, c_rs, c_cs,
            );
        }
        return;
    }
    // SAFETY: the caller's contract.
    if m <= small_m::MAX_M
        && unsafe {
            small_m::sgemm(
                m,
                n,
                k,
                a,
                a_rs,
                a_cs,
                b,
                b_rs,
                b_cs,
                c,
                c_rs,
                c_cs,
                threaded,
                small_m::wide(),
            )
        }
    {
        return;
    }
    let parallelism = if threaded {
        parallelism(m, n, k)
    } else {
        Parallelism::None
    };
    if let Parallelism::Rayon(threads) = parallelism
        && let Some(part) = column_split(m, n, k, threads)
    {
        let ptrs = SplitPtrs { a, b, c };
        use rayon::prelude::*;
        (0..n.div_ceil(part)).into_par_iter().for_each(|i| {
            let (a, b, c) = ptrs.get();
            let start = i * part;
            let cols = part.min(n - start);
            // SAFETY: the caller's contract, on the columns `start..start + cols` of `B`
            // and `C`; the parts write disjoint columns of `C`.
            unsafe {
                in_gemm(
                    m,
                    cols,
                    k,
                    a,
                    a_rs,
                    a_cs,
                    b.offset(start as isize * b_cs),
                    b_rs,
                    b_cs,
                    c.offset(start as isize * c_cs),
                    c_rs,
                    c_cs,
                    Parallelism::None,
                )
            };
        });
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        in_gemm(
            m,
            n,
            k,
            a,
            a_rs,
            a_cs,
            b,
            b_rs,
            b_cs,
            c,
            c_rs,
            c_cs,
            parallelism,
        )
    };
}

/// `C := A B` through `gemm` (writing `C` without reading it).
///
/// # Safety
/// As [`sgemm_strided`].
#[allow(clippy::too_many_arguments)]
unsafe fn in_gemm(
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
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract; with `read_dst == false` gemm writes dst without
    // reading it (its alpha is the factor on dst, its beta the one on the product).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            false,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The operands of a column-split product, shared by its parts.
#[derive(Clone, Copy)]
struct SplitPtrs {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
}
// SAFETY: the parts only read `a` and `b` and write disjoint columns of `c`, all inside
// the one `sgemm_strided` call that borrows them.
unsafe impl Send for SplitPtrs {}
// SAFETY: as above.
unsafe impl Sync for SplitPtrs {}

impl SplitPtrs {
    /// A method, so that closures capture the `Sync` wrapper and not its fields.
    fn get(&self) -> (*const f32, *const f32, *mut f32) {
        (self.a, self.b, self.c)
    }
}

/// Products of at most this many rows that `gemm` would run on several threads are cut into
/// column blocks, one single-threaded `gemm` call per thread ([`column_split`]).
pub const SPLIT_MAX_M: usize = 256;

/// The width of the column blocks that [`sgemm_strided`] cuts an `m x k · k x n` product
/// into for `threads` threads, or `None` to leave it to `gemm`'s own threads.
///
/// `gemm` threads a product of few rows (the decoder's 128 = 8 x 16 positions) with two
/// parallel loops per depth block (packing, then the products), each waiting for every
/// thread, on products of about 0.1 ms; a block per thread waits once (measured in the model:
/// 1-2% of an inference step, BENCHMARKS.md). The blocks are taken only where each sums
/// every element as the whole product does (the same depth blocks, [`depth_block`]), so the
/// values are the same bit for bit. `PEFT_GEMM_SPLIT=off` (read once) turns it off.
pub fn column_split(m: usize, n: usize, k: usize, threads: usize) -> Option<usize> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        !std::env::var("PEFT_GEMM_SPLIT").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    });
    if !on || threads < 2 || m <= small_m::MAX_M || m > SPLIT_MAX_M || reference_kernel() {
        return None;
    }
    let part = n.div_ceil(threads).next_multiple_of(16);
    if part < 128 || part >= n {
        return None;
    }
    let whole = depth_block(m, n, k)?;
    let last = n - part * (n.div_ceil(part) - 1);
    (depth_block(m, part, k) == Some(whole) && depth_block(m, last, k) == Some(whole))
        .then_some(part)
}

/// The logical first element of a BLAS vector: with a negative increment the vector is
/// walked from the end of the memory block backwards.
fn vector_start(len: usize, inc: c_int) -> isize {
    if inc < 0 {
        (len as isize - 1) * -(inc as isize)
    } else {
        0
    }
}

/// `y := alpha * op(A) * x + beta * y`.
///
/// # Safety
/// The CBLAS contract for `?gemv`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_impl<T: Scalar>(
    layout: c_int,
    trans: c_int,
    m: c_int,
    n: c_int,
    alpha: T,
    a: *const T,
    lda: c_int,
    x: *const T,
    incx: c_int,
    beta: T,
    y: *mut T,
    incy: c_int,
) {
    let (Some(row_major), Some(ta)) = (layout_is_row_major(layout), parse_trans(trans)) else {
        return;
    };
    if m < 0 || n < 0 || incx == 0 || incy == 0 {
        return;
    }
    if lda < (if row_major { n } else { m }).max(1) {
        return;
    }
    // op(A) is rows x cols; x has cols elements, y has rows.
    let (rows, cols) = if ta == Trans::No {
        (m as usize, n as usize)
    } else {
        (n as usize, m as usize)
    };
    if rows == 0 {
        return;
    }
    // SAFETY: the CBLAS contract makes y span (rows - 1) * |incy| + 1 elements.
    let y = unsafe { y.offset(vector_start(rows, incy)) };
    let incy = incy as isize;
    if alpha == T::ZERO || cols == 0 {
        // SAFETY: y is a rows x 1 matrix with row stride incy.
        unsafe { scale(rows, 1, beta, y, incy, 1) };
        return;
    }
    // SAFETY: as for y.
    let x = unsafe { x.offset(vector_start(cols, incx)) };
    let (a_rs, a_cs) = op_strides(row_major, ta, lda);
    // SAFETY: y (rows x 1), op(A) (rows x cols) and x (cols x 1) are valid per the CBLAS
    // contract; the column stride of a one-column matrix is never applied.
    unsafe {
        gemm::gemm(
            rows,
            1,
            cols,
            y,
            rows as isize * incy.abs(),
            incy,
            beta != T::ZERO,
            a,
            a_cs,
            a_rs,
            x,
            cols as isize * (incx as isize).abs(),
            incx as isize,
            beta,
            alpha,
            false,
            T::COMPLEX && ta == Trans::Conj,
            false,
            parallelism(rows, 1, cols),
        );
    }
}

/// `sum(x[i] * y[i])`, accumulated in `T`, eight lanes at a time when both are contiguous.
///
/// # Safety
/// The CBLAS contract for `?dot`.
unsafe fn dot_impl<T>(n: c_int, x: *const T, incx: c_int, y: *const T, incy: c_int) -> T
where
    T: Copy + Default + core::ops::Add<Output = T> + Mul<Output = T>,
{
    if n <= 0 {
        return T::default();
    }
    let len = n as usize;
    if incx == 1 && incy == 1 {
        // SAFETY: both vectors are contiguous with n elements.
        let (x, y) = unsafe {
            (
                core::slice::from_raw_parts(x, len),
                core::slice::from_raw_parts(y, len),
            )
        };
        let mut lanes = [T::default(); 8];
        let mut xs = x.chunks_exact(8);
        let mut ys = y.chunks_exact(8);
        for (xc, yc) in (&mut xs).zip(&mut ys) {
            for l in 0..8 {
                lanes[l] = lanes[l] + xc[l] * yc[l];
            }
        }
        let mut sum = T::default();
        for (&a, &b) in xs.remainder().iter().zip(ys.remainder()) {
            sum = sum + a * b;
        }
        let pairs = [
            lanes[0] + lanes[4],
            lanes[1] + lanes[5],
            lanes[2] + lanes[6],
            lanes[3] + lanes[7],
        ];
        return (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + sum;
    }
    let (x0, y0) = (vector_start(len, incx), vector_start(len, incy));
    let (incx, incy) = (incx as isize, incy as isize);
    let mut sum = T::default();
    for i in 0..len as isize {
        // SAFETY: the CBLAS contract makes both strided vectors valid for n elements.
        unsafe { sum = sum + *x.offset(x0 + i * incx) * *y.offset(y0 + i * incy) };
    }
    sum
}

/// CBLAS `sgemm`: `C := alpha * op(A) * op(B) + beta * C` in `f32`.
///
/// # Safety
/// The CBLAS contract: `a`, `b` and `c` point to matrices of the sizes the dimensions,
/// transpositions and leading dimensions describe, and `c` does not overlap `a` or `b`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_sgemm(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: c_float,
    a: *const c_float,
    lda: c_int,
    b: *const c_float,
    ldb: c_int,
    beta: c_float,
    c: *mut c_float,
    ldc: c_int,
) {
    count!(SGEMM);
    // SAFETY: forwarded contract.
    unsafe {
        gemm_impl(
            layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
        )
    }
}

/// CBLAS `dgemm`: `C := alpha * op(A) * op(B) + beta * C` in `f64`.
///
/// # Safety
/// As for [`cblas_sgemm`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_dgemm(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: c_double,
    a: *const c_double,
    lda: c_int,
    b: *const c_double,
    ldb: c_int,
    beta: c_double,
    c: *mut c_double,
    ldc: c_int,
) {
    count!(DGEMM);
    // SAFETY: forwarded contract.
    unsafe {
        gemm_impl(
            layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
        )
    }
}

/// CBLAS `cgemm` (single-precision complex, interleaved `[re, im]` pairs; `alpha` and
/// `beta` are passed by pointer).
///
/// # Safety
/// As for [`cblas_sgemm`]; `alpha` and `beta` point to one complex number each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_cgemm(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    lda: c_int,
    b: *const c_void,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ldc: c_int,
) {
    count!(CGEMM);
    // SAFETY: `c32` is `#[repr(C)] { re: f32, im: f32 }`, the CBLAS complex layout.
    unsafe {
        let (alpha, beta) = (*alpha.cast::<c32>(), *beta.cast::<c32>());
        gemm_impl(
            layout,
            transa,
            transb,
            m,
            n,
            k,
            alpha,
            a.cast::<c32>(),
            lda,
            b.cast::<c32>(),
            ldb,
            beta,
            c.cast::<c32>(),
            ldc,
        )
    }
}

/// CBLAS `zgemm` (double-precision complex).
///
/// # Safety
/// As for [`cblas_cgemm`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_zgemm(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    lda: c_int,
    b: *const c_void,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ldc: c_int,
) {
    count!(ZGEMM);
    // SAFETY: `c64` is `#[repr(C)] { re: f64, im: f64 }`, the CBLAS complex layout.
    unsafe {
        let (alpha, beta) = (*alpha.cast::<c64>(), *beta.cast::<c64>());
        gemm_impl(
            layout,
            transa,
            transb,
            m,
            n,
            k,
            alpha,
            a.cast::<c64>(),
            lda,
            b.cast::<c64>(),
            ldb,
            beta,
            c.cast::<c64>(),
            ldc,
        )
    }
}

/// CBLAS `sgemv`: `y := alpha * op(A) * x + beta * y`, `A` is `m x n`.
///
/// # Safety
/// The CBLAS contract: `a` is an `m x n` matrix with leading dimension `lda`, `x` and `y`
/// hold as many elements (times the absolute increment) as `op(A)` needs, and `y` does
/// not overlap `a` or `x`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_sgemv(
    layout: c_int,
    trans: c_int,
    m: c_int,
    n: c_int,
    alpha: c_float,
    a: *const c_float,
    lda: c_int,
    x: *const c_float,
    incx: c_int,
    beta: c_float,
    y: *mut c_float,
    incy: c_int,
) {
    count!(SGEMV);
    // SAFETY: forwarded contract.
    unsafe { gemv_impl(layout, trans, m, n, alpha, a, lda, x, incx, beta, y, incy) }
}

/// CBLAS `dgemv`.
///
/// # Safety
/// As for [`cblas_sgemv`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_dgemv(
    layout: c_int,
    trans: c_int,
    m: c_int,
    n: c_int,
    alpha: c_double,
    a: *const c_double,
    lda: c_int,
    x: *const c_double,
    incx: c_int,
    beta: c_double,
    y: *mut c_double,
    incy: c_int,
) {
    count!(DGEMV);
    // SAFETY: forwarded contract.
    unsafe { gemv_impl(layout, trans, m, n, alpha, a, lda, x, incx, beta, y, incy) }
}

/// CBLAS `sdot`: the dot product of two strided `f32` vectors (accumulated in `f32`).
///
/// # Safety
/// `x` and `y` hold `n` elements at increments `incx` and `incy` (negative increments walk
/// the block backwards, as in BLAS).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_sdot(
    n: c_int,
    x: *const c_float,
    incx: c_int,
    y: *const c_float,
    incy: c_int,
) -> c_float {
    count!(SDOT);
    // SAFETY: forwarded contract.
    unsafe { dot_impl(n, x, incx, y, incy) }
}

/// CBLAS `ddot`.
///
/// # Safety
/// As for [`cblas_sdot`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cblas_ddot(
    n: c_int,
    x: *const c_double,
    incx: c_int,
    y: *const c_double,
    incy: c_int,
) -> c_double {
    count!(DDOT);
    // SAFETY: forwarded contract.
    unsafe { dot_impl(n, x, incx, y, incy) }
}

#[cfg(test)]
mod tests;
