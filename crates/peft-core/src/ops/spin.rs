//! Workers kept awake while [`super::on_pool`] runs its closure.
//!
//! A worker of rayon's pool that finds no work spins for a few dozen rounds and then sleeps
//! on a futex; the next parallel kernel has to wake it (a system call on the waking side and
//! a wake-up latency on the other, larger on a VM). A decoding step runs about a hundred
//! parallel kernels with short serial stretches between them, so the second worker went to
//! sleep and was woken about a hundred times a step.
//!
//! While `on_pool` runs its closure, each other worker of the pool runs a *helper*: a job
//! that looks for pending work with [`rayon::yield_now`] (and runs it) until the closure
//! returns. A helper that finds no work for [`IDLE`] returns, so a long serial stretch (a
//! tokenizer, reading a file) does not keep a core busy; the next product from the closure's
//! thread ([`rearm`], called by the host kernels) starts the helpers again.
//!
//! A helper never runs on the thread that runs a closure, nor inside another helper (it
//! returns at once there), so it never blocks the closure it helps. It could still be
//! picked up by a worker waiting inside a job that the closure needs (rayon's waits run
//! other pending jobs); there it returns after [`IDLE`] without work, which bounds the
//! delay.
//!
//! The environment variable `PEFT_POOL_SPIN=off` (read once) turns the helpers off, for
//! A/B measurements. Values never depend on it: helpers only run jobs that some thread
//! would have run anyway.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a helper looks for work in vain before it returns.
const IDLE: Duration = Duration::from_millis(1);

/// Helpers running now, in the whole process (for the tests: none may outlive its closure
/// by more than a moment).
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Helpers started so far, in the whole process (for the tests).
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// One `on_pool` closure's helpers.
struct Spin {
    /// Set when the closure returns or unwinds.
    done: AtomicBool,
    /// Helpers spawned and not yet returned.
    alive: AtomicUsize,
}

/// What this thread is doing for the helpers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Neither: a helper may run here.
    Free,
    /// Running an `on_pool` closure.
    Closure,
    /// Running a helper.
    Helper,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Free) };
    /// The helpers of the closure this thread runs, if any.
    static CURRENT: RefCell<Option<Arc<Spin>>> = const { RefCell::new(None) };
}

/// Whether helpers run at all (`PEFT_POOL_SPIN` not `off`, more than one worker); read once.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !std::env::var("PEFT_POOL_SPIN").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    }) && rayon::current_num_threads() > 1
}

/// Runs `f` (on the current thread, a worker of the pool) with the other workers kept
/// awake; just `f` when this thread already runs a closure with helpers, or runs a helper.
pub(super) fn run<R>(f: impl FnOnce() -> R) -> R {
    if !enabled() || ROLE.with(Cell::get) != Role::Free {
        return f();
    }
    let spin = Arc::new(Spin {
        done: AtomicBool::new(false),
        alive: AtomicUsize::new(0),
    });
    /// Restores the thread's state and stops the helpers when `f` returns or unwinds.
    struct Scope(Arc<Spin>);
    impl Drop for Scope {
        fn drop(&mut self) {
            self.0.done.store(true, Ordering::Release);
            ROLE.with(|r| r.set(Role::Free));
            CURRENT.with(|c| c.borrow_mut().take());
        }
    }
    ROLE.with(|r| r.set(Role::Closure));
    CURRENT.with(|c| *c.borrow_mut() = Some(spin.clone()));
    let _scope = Scope(spin.clone());
    start(&spin);
    f()
}

/// Starts the helpers of the closure this thread runs again if they all returned (called
/// by the host kernels before they split work between threads; a thread-local read
/// otherwise).
#[cfg_attr(not(feature = "ndarray"), allow(dead_code))]
pub(super) fn rearm() {
    if ROLE.with(Cell::get) != Role::Closure {
        return;
    }
    CURRENT.with(|c| {
        if let Some(spin) = c.borrow().as_ref()
            && spin.alive.load(Ordering::Acquire) == 0
        {
            start(spin);
        }
    });
}

/// Spawns one helper per other worker.
fn start(spin: &Arc<Spin>) {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    spin.alive.fetch_add(helpers, Ordering::AcqRel);
    for _ in 0..helpers {
        let spin = spin.clone();
        rayon::spawn(move || help(&spin));
    }
}

/// A helper: runs pending work until the closure returns, or until it finds none for
/// [`IDLE`].
fn help(spin: &Spin) {
    /// Counts the helper out (and frees the thread) however it returns.
    struct Out<'a>(&'a Spin, bool);
    impl Drop for Out<'_> {
        fn drop(&mut self) {
            if self.1 {
                ROLE.with(|r| r.set(Role::Free));
                LIVE.fetch_sub(1, Ordering::AcqRel);
            }
            self.0.alive.fetch_sub(1, Ordering::AcqRel);
        }
    }
    if ROLE.with(Cell::get) != Role::Free {
        let _out = Out(spin, false);
        return;
    }
    ROLE.with(|r| r.set(Role::Helper));
    LIVE.fetch_add(1, Ordering::AcqRel);
    STARTED.fetch_add(1, Ordering::Relaxed);
    let _out = Out(spin, true);
    let mut idle_since: Option<Instant> = None;
    let mut rounds = 0u32;
    while !spin.done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        // Yield the core, as rayon's own idle rounds do, so that another process's threads
        // (data-parallel workers sharing the CPU) run in the meantime.
        std::thread::yield_now();
        rounds = rounds.wrapping_add(1);
        // The clock every 16 rounds: a round without work takes about a microsecond.
        if rounds.is_multiple_of(16) {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE {
                return;
            }
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};

    use super::{LIVE, STARTED};
    use crate::ops::{matmul, on_pool};

    /// Waits (at most 5 s) until no helper runs; false if some still did.
    fn helpers_stop() -> bool {
        let start = Instant::now();
        while LIVE.load(Ordering::Acquire) > 0 {
            if start.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Products inside `on_pool` (with helpers) equal the same products outside, bit for bit,
    /// from many threads at once, and no helper outlives its closure, after a panic too.
    #[test]
    fn helpers_change_no_value_and_stop() {
        let device = Default::default();
        let shapes = [(8usize, 512usize, 384usize), (96, 128, 200), (1, 64, 2048)];
        let operands: Vec<_> = shapes
            .iter()
            .map(|&(m, k, n)| {
                let a = Tensor::<NdArray<f32>, 2>::random([m, k], Distribution::Default, &device);
                let b = Tensor::<NdArray<f32>, 2>::random([k, n], Distribution::Default, &device);
                let want = matmul(a.clone(), b.clone()).into_data();
                (a, b, want)
            })
            .collect();
        // Four callers at once, each with its own closure and helpers, under a watchdog: a
        // deadlock fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (tx, operands) = (tx.clone(), &operands);
                s.spawn(move || {
                    for _ in 0..10 {
                        on_pool(|| {
                            for (a, b, want) in operands {
                                let got = matmul(a.clone(), b.clone()).into_data();
                                got.assert_eq(want, true);
                                // A nested call runs in place, with the same values.
                                on_pool(|| matmul(a.clone(), b.clone()).into_data())
                                    .assert_eq(want, true);
                            }
                        });
                    }
                    tx.send(()).expect("the test waits");
                });
            }
            drop(tx);
            for _ in 0..4 {
                rx.recv_timeout(Duration::from_secs(120))
                    .expect("every caller finishes (no deadlock)");
            }
        });
        assert!(helpers_stop(), "helpers stop once their closures return");
        if super::enabled() {
            assert!(STARTED.load(Ordering::Relaxed) > 0, "helpers ran");
        }
        // A closure that panics: the panic reaches the caller, and the helpers stop.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            on_pool(|| {
                let (a, b, _) = &operands[0];
                let _ = matmul(a.clone(), b.clone());
                panic!("inside on_pool");
            })
        }));
        assert!(caught.is_err());
        assert!(helpers_stop(), "helpers stop after a panic");
        assert_eq!(on_pool(|| 6 * 7), 42, "the pool still works");
    }
}
