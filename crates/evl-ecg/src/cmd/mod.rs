//! One module per noun; one function per verb.

mod bench;
mod bench_data;
mod bench_infer;
pub(crate) mod data;
mod eval;
pub(crate) mod quickstart;
mod score;
mod train;

use crate::args::{BenchVerb, Cli, DataVerb, ImportVerb, Noun, ScoreVerb, TrainVerb};

/// Dispatches a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.noun {
        Noun::Bench(BenchVerb::Losses(a)) => bench::losses(&a, cli.json),
        Noun::Bench(BenchVerb::Io(a)) => bench_data::io(&a, cli.json),
        Noun::Bench(BenchVerb::Render(a)) => bench_data::render(&a, cli.json),
        Noun::Bench(BenchVerb::Infer(a)) => bench_infer::run(&a, cli.json),
        Noun::Data(DataVerb::Inspect(a)) => data::inspect(&a, cli.json),
        Noun::Data(DataVerb::Convert(a)) => data::convert(&a),
        Noun::Data(DataVerb::Synth(a)) => data::synth(&a, cli.json),
        Noun::Data(DataVerb::Import(ImportVerb::Ptbxl(a))) => data::import_ptbxl(&a, cli.json),
        Noun::Render(a) => data::render(&a),
        Noun::Quickstart(a) => quickstart::run(&a, cli.json),
        Noun::Interpret(a) => quickstart::interpret(&a, cli.json),
        Noun::Eval(a) => eval::run(&a, cli.json),
        Noun::Train(TrainVerb::Teacher(a)) => {
            train::run_train(evl_train::job::Role::Teacher, &a, cli.json)
        }
        Noun::Train(TrainVerb::Student(a)) => {
            train::run_train(evl_train::job::Role::Student, &a, cli.json)
        }
        Noun::Distill(a) => train::run_distill(&a, cli.json),
        Noun::Report(a) => report(&a, cli.json),
        Noun::Score(ScoreVerb::Ecgbench(a)) => score::ecgbench(&a, cli.json),
    }
}

/// `report`.
fn report(a: &crate::args::ReportArgs, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let w = evl_report::write_report(&a.run, a.out.as_deref())
        .with_context(|| format!("writing the report of {}", a.run.display()))?;
    if json {
        println!("{}", serde_json::json!({"type": "summary", "data": w}));
    } else {
        for s in &w.skipped {
            eprintln!("note: not drawn: {s}");
        }
        println!("wrote {} ({} figures)", w.html.display(), w.figures.len());
    }
    Ok(())
}
