//! Every corpus input and every crash ever found (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through its target: none may panic. This is how CI replays
//! the fuzzing corpus on stable Rust.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

#[test]
fn corpus_and_regressions_replay_without_panic() {
    let root = evl_testkit::workspace_root().join("fuzz");
    let mut total = 0;
    for target in evl_fuzz::TARGETS {
        let (mut n, mut accepted) = (0, 0);
        for sub in ["corpus", "regressions"] {
            let dir = root.join(sub).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                let data = std::fs::read(f).unwrap();
                let r = std::panic::catch_unwind(|| evl_fuzz::run(target, &data));
                let Ok(ok) = r else {
                    panic!("{target}: {} panics", rel(&root, f));
                };
                accepted += usize::from(ok && sub == "corpus");
                n += 1;
            }
        }
        assert!(n > 0, "fuzz/corpus/{target} has no seeds");
        // Seeds that all fail at the first check would leave the deep paths unfuzzed.
        assert!(
            accepted > 0,
            "no seed of fuzz/corpus/{target} is read successfully"
        );
        total += n;
    }
    evl_testkit::say(&format!("replayed {total} fuzz inputs"));
}

fn rel(root: &Path, f: &Path) -> String {
    f.strip_prefix(root).unwrap_or(f).display().to_string()
}
