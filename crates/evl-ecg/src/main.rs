//! `evl-ecg`: the command-line tool. Parses arguments, dispatches to `cmd::<noun>`, maps
//! outcomes to exit codes (0 done, 2 error, 101 a bug). No domain logic lives here.

mod args;
mod cmd;

use clap::Parser;

// mimalloc keeps freed pages for reuse: reading many records (fresh multi-megabyte signal
// buffers each time) spent a third of its time in page faults under the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

/// mimalloc's `mi_option_purge_delay`. libmimalloc-sys exports no constant for it; in the
/// pinned version's header (`c_src/mimalloc/v3/include/mimalloc.h`) it is the option just
/// before `mi_option_use_numa_nodes`, which it does export.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// How long freed memory stays committed before mimalloc returns it to the OS, in ms
/// (mimalloc 3.3's default is 1 s; 10 s is jemalloc's default decay). A training step frees
/// and re-allocates the same few hundred MB of loss buffers every few hundred ms; with the
/// default, 30 paper-shape objective steps took 30-40k page faults and 0.5-0.9 s of kernel
/// page zeroing (perf: `clear_page_erms`, 4-20% of CPU time), against about 490 faults and
/// under 0.1 s with this delay, and the median step was about 4% faster. Peak memory is
/// unchanged. A user's own `MIMALLOC_PURGE_DELAY` wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn main() -> ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` takes an option number and a value and only stores the
        // value; it is not thread-safe, and this runs first in `main`, before any thread of
        // ours (rayon's pool starts lazily later).
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
    let cli = args::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("Caused by:\n  {cause}");
            }
            ExitCode::from(2)
        }
    }
}
