//! The native engine's per-record work (what `bench infer` times for it) in a loop, for a
//! profiler: `perf record target/release/examples/native_loop MODEL_DIR [RECORDS_DIR] [REPS]`.
//! Prints the median ms per record at the end; with `EVL_LOOP=interpret` it times the
//! whole `interpret` (preparing the record as read, then the model) instead.
#![allow(clippy::unwrap_used, clippy::print_stdout)] // a profiling aid, not library code

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = std::path::PathBuf::from(args.get(1).expect("MODEL_DIR"));
    let data = args.get(2).map_or_else(
        || {
            ecg_data::shared_data()
                .unwrap()
                .join("ptbxl_subset/records500")
        },
        std::path::PathBuf::from,
    );
    let reps: usize = args.get(3).map_or(200, |r| r.parse().unwrap());
    let engine = evl_infer::bundle::Engine::load(&model).unwrap();
    let records: Vec<_> = ecg_data::walk(&data, "hea")
        .into_iter()
        .take(20)
        .map(|h| ecg_io::read_record(&h, ecg_io::ReadOptions::default()).unwrap())
        .collect();
    let samples: Vec<_> = records.iter().map(|r| engine.prepare(r).unwrap()).collect();
    let whole = std::env::var("EVL_LOOP").is_ok_and(|v| v == "interpret");
    let mut times = Vec::new();
    for _ in 0..reps {
        for (r, s) in records.iter().zip(&samples) {
            let t = Instant::now();
            if whole {
                std::hint::black_box(engine.interpret(r).unwrap());
            } else {
                std::hint::black_box(engine.answer(s, None));
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} records x {reps}: median {:.3} ms/record",
        records.len(),
        times[times.len() / 2]
    );
}
