//! One module per noun; one function per verb.

/// `println!` that returns the write error instead of panicking: a closed stdout
/// (`evl-ecg data inspect R | head -1`) ends the command with a broken-pipe error, which
/// `main` turns into a quiet exit 0 as other Unix tools do.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// A progress line printed from inside a running job (a callback that cannot return an
/// error): a closed stdout is ignored there and the job finishes and writes its files.
macro_rules! progress {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub(crate) mod data;
mod eval;
mod model;
mod plan;
pub(crate) mod quickstart;
mod score;
mod serve;
mod train;

use crate::args::{BenchVerb, Cli, DataVerb, ImportVerb, ModelVerb, Noun, ScoreVerb, TrainVerb};

/// The one place a `--device` becomes a device (inference mode; `.autodiff()` for training).
pub(crate) fn device(spec: evl_models::DeviceSpec) -> anyhow::Result<evl_models::device::Device> {
    spec.device()
        .map_err(|e| anyhow::anyhow!("--device {spec}: {e}"))
}

/// Dispatches a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.noun {
        Noun::Bench(BenchVerb::Losses(a)) => evl_bench::losses::losses(&a, cli.json),
        Noun::Bench(BenchVerb::Io(a)) => evl_bench::data::io(&a, cli.json),
        Noun::Bench(BenchVerb::Render(a)) => evl_bench::data::render(&a, cli.json),
        Noun::Bench(BenchVerb::Infer(a)) => evl_bench::infer::run(&a, cli.json),
        Noun::Bench(BenchVerb::Train(a)) => evl_bench::train::run(&a, cli.json),
        Noun::Bench(BenchVerb::Hf(a)) => evl_bench::hf::run(&a, cli.json),
        Noun::Bench(BenchVerb::Serve(a)) => evl_bench::serve::run(&a, cli.json),
        Noun::Data(DataVerb::Inspect(a)) => data::inspect(&a, cli.json),
        Noun::Data(DataVerb::Convert(a)) => data::convert(&a),
        Noun::Data(DataVerb::Synth(a)) => data::synth(&a, cli.json),
        Noun::Data(DataVerb::Import(ImportVerb::Ptbxl(a))) => data::import_ptbxl(&a, cli.json),
        Noun::Render(a) => data::render(&a),
        Noun::Quickstart(a) => quickstart::run(&a, cli.json),
        Noun::Interpret(a) => quickstart::interpret(&a, cli.json),
        Noun::Eval(a) => eval::run(&a, cli.json),
        Noun::Train(TrainVerb::Teacher(a)) => {
            train::run_train(evl_ops::job::Role::Teacher, &a, cli.json)
        }
        Noun::Train(TrainVerb::Student(a)) => {
            train::run_train(evl_ops::job::Role::Student, &a, cli.json)
        }
        Noun::Distill(a) => train::run_distill(&a, cli.json),
        Noun::Report(a) => report(&a, cli.json),
        Noun::Plan(a) => plan::run(&a, cli.json),
        Noun::Serve(a) => serve::run(&a, cli.json),
        Noun::Model(ModelVerb::Quantize(a)) => model::quantize(&a, cli.json),
        Noun::Score(ScoreVerb::Ecgbench(a)) => score::ecgbench(&a, cli.json),
    }
}

/// `report`.
fn report(a: &crate::args::ReportArgs, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let w = evl_report::write_report(&a.run, a.out.as_deref())
        .with_context(|| format!("writing the report of {}", a.run.display()))?;
    if json {
        out!("{}", serde_json::json!({"type": "summary", "data": w}));
    } else {
        for s in &w.skipped {
            eprintln!("note: not drawn: {s}");
        }
        out!("wrote {} ({} figures)", w.html.display(), w.figures.len());
    }
    Ok(())
}
