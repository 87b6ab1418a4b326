//! The `otpd` binary; what it does is `otpd::commands`.

use std::process::ExitCode;

// glibc's malloc was a fifth of a check's CPU in profiles (arena locking and
// consolidation across the runtime's threads); mimalloc's per-thread free
// lists make the many small per-request allocations cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    otpd::commands::main()
}
