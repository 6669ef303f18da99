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

fn main() -> ExitCode {
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
