//! One module per noun; one function per verb.

mod bench;

use crate::args::{BenchVerb, Cli, Noun};

/// Dispatches a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.noun {
        Noun::Bench(BenchVerb::Losses(a)) => bench::losses(&a, cli.json),
    }
}
