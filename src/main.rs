//! The `otpd` binary; what it does is `otpd::commands`.

use std::process::ExitCode;

// glibc's malloc was a fifth of a check's CPU in profiles (arena locking and
// consolidation across the runtime's threads); mimalloc's per-thread free
// lists make the many small per-request allocations cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_c_heap();
    otpd::commands::main()
}

/// SQLite allocates with glibc's malloc, not mimalloc. With glibc's defaults,
/// the statement journals SQLite frees at the end of the writer's savepoints
/// sometimes left enough free memory at the top of the writer's arena for
/// glibc to hand it back (`madvise`) and fault it in again a moment later:
/// each time a TLB shootdown across the CPUs. For whole phases of the
/// benchmark that doubled the CPU of SQLite's checks. So each arena keeps up
/// to 64 MiB free, and allocations up to 32 MiB come from the arenas rather
/// than from mappings of their own.
fn keep_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` takes two integers and only sets malloc's tunables;
    // this runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}
