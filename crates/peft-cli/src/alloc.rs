//! The `peft` binary's allocator.
//!
//! mimalloc keeps freed large blocks for reuse instead of returning them to the OS and faulting
//! fresh zeroed pages in for the next large temporary. Measured with `cargo xtask bench
//! --compare-allocators` (BENCHMARKS.md): greedy generation 1.43x faster, a LoRA training step
//! and inference unchanged, peak RSS 17-20% higher. So inference commands (`generate`,
//! `forward`, `serve`, ...) use mimalloc and training (`train`, and `bench` of a training
//! workload) keeps the system allocator and its lower peak. `PEFT_ALLOCATOR=system|mimalloc`
//! overrides the choice, which is how the bench measures both with one binary.
//!
//! With glibc's allocator, [`tune_glibc`] keeps freed memory in the heap for the next step's
//! temporaries instead of trimming it and faulting zeroed pages in again; mimalloc is told
//! the same by [`tune_mimalloc`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// mimalloc, or the system allocator when `PEFT_ALLOCATOR=system`; chosen once, at the first
/// allocation, before anything is allocated (so every block is freed by the allocator that made
/// it).
pub struct Switch;

const UNSET: u8 = 0;
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;
static CHOICE: AtomicU8 = AtomicU8::new(UNSET);

unsafe extern "C" {
    // libc's getenv: reads the environment without allocating.
    fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
}

unsafe extern "C" {
    fn open(path: *const std::ffi::c_char, flags: i32) -> i32;
    fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
    fn close(fd: i32) -> i32;
}

/// Whether the command line asks for training (`peft train`, or `peft bench` of a training
/// workload), read from `/proc/self/cmdline` into a stack buffer: nothing may be allocated
/// before the allocator is chosen.
fn training_command() -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path, a buffer of the size given, the descriptor closed.
    let n = unsafe {
        let fd = open(c"/proc/self/cmdline".as_ptr(), 0);
        if fd < 0 {
            return false;
        }
        let n = read(fd, buf.as_mut_ptr(), buf.len());
        close(fd);
        n
    };
    if n <= 0 {
        return false;
    }
    is_training(&buf[..n as usize])
}

/// Whether a NUL-separated command line (`/proc/self/cmdline`) is `peft [--device D] train ...`
/// or `peft bench ... --workload lora-train|full-train`.
fn is_training(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|&b| b == 0).skip(1);
    let mut command: &[u8] = b"";
    while let Some(a) = args.next() {
        if a == b"--device" {
            args.next();
        } else if !a.starts_with(b"-") {
            command = a;
            break;
        }
    }
    match command {
        b"train" => true,
        b"bench" => {
            while let Some(a) = args.next() {
                let w = if a == b"--workload" {
                    args.next().unwrap_or(b"")
                } else if let Some(w) = a.strip_prefix(b"--workload=") {
                    w
                } else {
                    continue;
                };
                return w == b"lora-train" || w == b"full-train";
            }
            false
        }
        _ => false,
    }
}

/// glibc's allocator, set for a training loop, which frees and allocates the same large
/// temporaries every step: blocks up to 32 MB come from the heap (not from `mmap`, unmapped
/// again on free), the heap keeps up to 256 MB free at its top instead of giving it back, and
/// grows 64 MB at a time. Each step then reuses the last step's pages; before, a LoRA step on
/// the bench's mT5-small spent about 5% of its time in the kernel zeroing fresh pages.
/// Measured: LoRA step 0.96-0.99 -> 0.91-1.00 s median (0.96 -> 0.92 s best), system time
/// 1.0 -> 0.7 s per run, peak RSS unchanged (713-718 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_glibc() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only sets parameters of glibc's allocator, which has not allocated yet;
    // a value it rejects leaves that parameter as it was.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 256 << 20);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_glibc() {}

/// mimalloc, set never to purge (decommit) freed memory, unless `MIMALLOC_PURGE_DELAY` says
/// otherwise: by default it gives freed pages back after 10 ms, and the next forward pass's
/// temporaries fault them in again, zeroed. Measured (3 alternated runs): infer-base
/// 0.396-0.403 -> 0.365-0.388 s median, generation 0.457-0.466 -> 0.416-0.459 s, peak RSS
/// unchanged (408 and 395 MiB).
fn tune_mimalloc() {
    unsafe extern "C" {
        fn mi_option_set(option: i32, value: std::ffi::c_long);
    }
    /// `mi_option_purge_delay` in the mimalloc (v3) that libmimalloc-sys builds.
    const MI_OPTION_PURGE_DELAY: i32 = 15;
    // SAFETY: a NUL-terminated name, read before any other thread exists.
    let asked = unsafe { getenv(c"MIMALLOC_PURGE_DELAY".as_ptr()) };
    if asked.is_null() {
        // SAFETY: sets one of mimalloc's options before it allocates; -1 is a valid value.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[inline]
fn choice() -> u8 {
    match CHOICE.load(Ordering::Relaxed) {
        UNSET => {
            // SAFETY: a NUL-terminated name; the result is read before any other thread could
            // change the environment (nothing in peft calls setenv).
            let v = unsafe { getenv(c"PEFT_ALLOCATOR".as_ptr()) };
            let asked = (!v.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes());
            let c = match asked {
                Some(b"system") => SYSTEM,
                Some(b"mimalloc") => MIMALLOC,
                _ if training_command() => SYSTEM,
                _ => MIMALLOC,
            };
            if c == SYSTEM {
                tune_glibc();
            } else {
                tune_mimalloc();
            }
            CHOICE.store(c, Ordering::Relaxed);
            c
        }
        c => c,
    }
}

// SAFETY: every call is forwarded to one of two sound allocators, the same one for the whole
// life of the process.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if choice() == SYSTEM {
            unsafe { System.alloc(layout) }
        } else {
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if choice() == SYSTEM {
            unsafe { System.dealloc(ptr, layout) }
        } else {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if choice() == SYSTEM {
            unsafe { System.alloc_zeroed(layout) }
        } else {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if choice() == SYSTEM {
            unsafe { System.realloc(ptr, layout, new_size) }
        } else {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn training_commands_are_recognised() {
        let t = |s: &str| super::is_training(s.replace(' ', "\0").as_bytes());
        assert!(t("peft train --model x"));
        assert!(t("peft --device cpu train"));
        assert!(t("peft bench --workload lora-train --steps 3"));
        assert!(t("peft bench --steps 3 --workload=full-train"));
        assert!(!t("peft bench --workload generate"));
        assert!(!t("peft generate --model train"));
        assert!(!t("peft serve --model m"));
        assert!(!t("peft"));
    }
}
