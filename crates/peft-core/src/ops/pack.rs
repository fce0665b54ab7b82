//! A layer's weight packed once for decoding products ([`DecodePack`]).

use std::sync::{Arc, Mutex};

/// The packed copy of one layer's weight for products with few rows (a decoding step: one
/// row per sequence, at most [`peft_gemm::SMALL_M`]), which [`super::matmul_packed`] reads
/// instead of the weight on burn-ndarray.
///
/// A decoding step reads every weight of the decoder and the LM head once for a few rows,
/// so its time is reading memory. In place, a row-major weight is read a cache line from
/// each row at a time; packed in panels of 16 columns ([`peft_gemm::PackedB`]) it is read
/// as one sequential stream per thread: on the 2-core Xeon a decoding step's 73 products
/// took 4.4-4.9 ms packed against 7.3-8.7 ms in place (`BENCHMARKS.md`).
///
/// - **When.** Only in a slot turned [`on`](DecodePack::on): `peft serve` and the bench's
///   generation turn a model's on; a new slot is off, so a one-shot generation does not pay
///   for packing. The first small product with a weight runs in place and notes it; the
///   second with the same weight packs it (one pass over it, on rayon's threads), and later
///   ones read the packed copy.
/// - **Which weight.** The copy is used only while the layer's weight is the very tensor
///   it was made from: the same buffer, shape and strides. The slot keeps a reference to
///   that tensor, so its buffer is neither freed nor written in place (burn-ndarray copies
///   a buffer that another tensor shares before writing it) while the copy names it. A new
///   weight (merging an adapter, loading weights, an optimizer step) is a new buffer: the
///   stale copy is dropped at the next small product and the new weight packed at the one
///   after.
/// - **Memory.** A packed copy is as large as its weight (its last panel padded to 16
///   columns), kept as long as the layer, or until the weight changes. Generation with the
///   bench's mT5-small packs the decoder and the LM head: 154 MB. `PEFT_DECODE_PACK=off`
///   (read once) never packs, even in slots turned on, for A/B runs.
/// - **Values.** Each output is the same chain of fused multiply-adds as the in-place
///   product's, so results are the same bit for bit either way.
///
/// Clones share the slot (a layer's clone shares its weight too). Default: off, empty.
#[derive(Clone, Default)]
pub struct DecodePack(Arc<Mutex<State>>);

impl std::fmt::Debug for DecodePack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePack")
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl DecodePack {
    /// Bytes of the packed copy held now (0 when none).
    pub fn bytes(&self) -> usize {
        #[cfg(feature = "ndarray")]
        if let Ok(state) = self.0.lock() {
            return state.packed.as_ref().map_or(0, |e| e.packed.bytes());
        }
        0
    }

    /// Drops the packed copy, if any (made again at the second small product after, while
    /// the slot is [`on`](Self::on)).
    pub fn clear(&self) {
        if let Ok(mut state) = self.0.lock() {
            let on = state.on;
            *state = State {
                on,
                ..State::default()
            };
        }
    }

    /// Lets the slot pack its layer's weight (from the second small product on). A new slot
    /// does not pack: packing writes a copy as large as the weight into fresh memory, which
    /// costs more than a short generation gains (10 tokens of the bench's mT5-small took
    /// 0.68-0.83 s with packing against 0.27 s without, the first time). Turn it on where a
    /// model decodes many steps, as `peft serve` does:
    /// `model.visit_linears(&mut |_, l| l.decode_pack.on())`.
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Distribution, Tensor};
    /// use peft_core::ops::{DecodePack, matmul_packed};
    ///
    /// let device = Default::default();
    /// let w = Tensor::<NdArray, 2>::random([256, 384], Distribution::Default, &device);
    /// let pack = DecodePack::default();
    /// for _ in 0..3 {
    ///     let x = Tensor::<NdArray, 2>::random([2, 256], Distribution::Default, &device);
    ///     matmul_packed(x, w.clone(), &pack);
    /// }
    /// assert_eq!(pack.bytes(), 0, "a new slot does not pack");
    /// pack.on();
    /// for _ in 0..3 {
    ///     let x = Tensor::<NdArray, 2>::random([2, 256], Distribution::Default, &device);
    ///     matmul_packed(x, w.clone(), &pack);
    /// }
    /// // Packed where the CPU has AVX2 and FMA (x86-64), unless PEFT_DECODE_PACK=off.
    /// println!("packed: {} bytes", pack.bytes());
    /// pack.off();
    /// assert_eq!(pack.bytes(), 0);
    /// ```
    pub fn on(&self) {
        if let Ok(mut state) = self.0.lock() {
            state.on = true;
        }
    }

    /// Stops the slot packing and drops its copy: products read the weight in place.
    pub fn off(&self) {
        if let Ok(mut state) = self.0.lock() {
            *state = State::default();
        }
    }
}

#[derive(Default)]
struct State {
    /// Pack ([`DecodePack::on`]); a new slot does not.
    on: bool,
    /// The weight of the last small product, not packed yet.
    #[cfg(feature = "ndarray")]
    seen: Option<host::Key>,
    /// The packed weight.
    #[cfg(feature = "ndarray")]
    packed: Option<host::Entry>,
}

#[cfg(feature = "ndarray")]
pub(super) mod host {
    use std::sync::Arc;

    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;
    use ndarray::{ArcArray, IxDyn};
    use peft_gemm::PackedB;

    use super::DecodePack;
    use crate::ops::host::{back, cast, view};

    /// Which tensor a packed copy was made from: where its data starts, its shape and strides.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) struct Key {
        ptr: usize,
        k: usize,
        n: usize,
        rs: isize,
        cs: isize,
    }

    /// A packed copy and the tensor it was made from.
    pub(super) struct Entry {
        key: Key,
        /// Held so that the buffer the key names stays alive and unwritten.
        _weight: NdArrayTensor,
        pub(super) packed: Arc<PackedB>,
    }

    /// Whether packing is on (not `PEFT_DECODE_PACK=off`); read once.
    fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            !std::env::var("PEFT_DECODE_PACK").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
        })
    }

    /// `x · w` through `w`'s packed copy, on plain NdArray `f32` with `x` `[m, k]`,
    /// `m <= SMALL_M`, and `w` `[k, n]` (any non-negative strides); the inputs back when it
    /// does not apply, including the first product with a weight (see [`DecodePack`]).
    pub(in crate::ops) fn matmul<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        pack: &DecodePack,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        if !enabled() {
            return Err([x, w]);
        }
        let x = match cast::<_, NdArrayTensor>(x) {
            Ok(x) => x,
            Err(x) => return Err([x, w]),
        };
        let w = match cast::<_, NdArrayTensor>(w) {
            Ok(w) => w,
            Err(w) => return Err([back::<B, _>(x), w]),
        };
        match product(&x, &w, pack) {
            Some(y) => Ok(back::<B, _>(y)),
            None => Err([back::<B, _>(x), back::<B, _>(w)]),
        }
    }

    fn product(x: &NdArrayTensor, w: &NdArrayTensor, pack: &DecodePack) -> Option<NdArrayTensor> {
        let (xv, wv) = (view(x)?, view(w)?);
        if xv.ndim() != 2 || wv.ndim() != 2 {
            return None;
        }
        let (m, k, n) = (xv.shape()[0], xv.shape()[1], wv.shape()[1]);
        let (x_rs, x_cs) = (xv.strides()[0], xv.strides()[1]);
        let (rs, cs) = (wv.strides()[0], wv.strides()[1]);
        // Only what the product in place would send to the decoding kernel, whose values
        // the packed one reproduces: not a small weight, not a transposed one.
        if wv.shape()[0] != k
            || x_rs < 0
            || x_cs < 0
            || rs < 0
            || !peft_gemm::packed_matches_in_place(m, n, k, cs)
        {
            return None;
        }
        let key = Key {
            ptr: wv.as_ptr() as usize,
            k,
            n,
            rs,
            cs,
        };
        crate::ops::spin::rearm();
        let held = {
            let mut state = pack.0.lock().ok()?;
            if !state.on {
                return None;
            }
            match &state.packed {
                Some(e) if e.key == key => Some(e.packed.clone()),
                _ => {
                    // A stale copy goes now; the weight is packed at its second product.
                    state.packed = None;
                    if state.seen != Some(key) {
                        state.seen = Some(key);
                        return None;
                    }
                    state.seen = None;
                    None
                }
            }
        };
        let packed = match held {
            Some(packed) => packed,
            None => {
                // Packed with the lock released: packing runs on rayon's threads, and a
                // thread waiting there may take up another product with this slot.
                // SAFETY: the view covers `k x n` elements at these strides.
                let packed = Arc::new(unsafe { PackedB::pack(k, n, wv.as_ptr(), rs, cs) }?);
                let mut state = pack.0.lock().ok()?;
                if state.on && state.packed.is_none() {
                    state.packed = Some(Entry {
                        key,
                        _weight: w.clone(),
                        packed: packed.clone(),
                    });
                }
                packed
            }
        };
        let len = m * n;
        let mut out = Vec::<f32>::with_capacity(len);
        // SAFETY: x is `m x k` at these strides, `out` has room for `m x n` row-major and
        // does not overlap x; `packed` is `k x n`.
        let took = unsafe {
            peft_gemm::sgemm_packed(
                m,
                xv.as_ptr(),
                x_rs,
                x_cs,
                &packed,
                out.as_mut_ptr(),
                n as isize,
                1,
                true,
            )
        };
        if !took {
            return None;
        }
        // SAFETY: the product wrote all `m x n` elements.
        unsafe { out.set_len(len) };
        let y = ArcArray::from_shape_vec(IxDyn(&[m, n]), out).ok()?;
        Some(NdArrayTensor::from(y))
    }
}
