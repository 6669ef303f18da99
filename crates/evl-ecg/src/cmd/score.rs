//! `evl-ecg score ecgbench`.

use anyhow::{Context, Result};
use evl_eval::ecgbench::{Task, read_gold, read_predictions, score};

use crate::args::{EcgbenchTask, ScoreEcgbenchArgs};

fn pct(x: Option<f64>) -> String {
    match x {
        Some(v) => format!("{:.1}", v * 100.0),
        None => "nan".into(),
    }
}

/// `score ecgbench`.
pub fn ecgbench(a: &ScoreEcgbenchArgs, json: bool) -> Result<()> {
    let task = match a.task {
        EcgbenchTask::Ptb => Task::Ptb,
        EcgbenchTask::Cpsc => Task::Cpsc,
        EcgbenchTask::Code15 => Task::Code15,
        EcgbenchTask::Csn => Task::Csn,
        EcgbenchTask::G12 => Task::G12,
        EcgbenchTask::Mmmu => Task::Mmmu,
        EcgbenchTask::Ecgqa => Task::Ecgqa,
    };
    let gold = read_gold(&a.gold).with_context(|| format!("reading gold {}", a.gold.display()))?;
    let preds = read_predictions(&a.pred)
        .with_context(|| format!("reading predictions {}", a.pred.display()))?;
    let s = score(task, &preds, &gold, a.strict, &a.pred).context("scoring")?;
    if json {
        out!("{}", serde_json::json!({"type": "score", "data": s}));
        out!(
            "{}",
            serde_json::json!({"type": "summary", "data": {"task": s.task, "n": s.n}})
        );
        return Ok(());
    }
    out!(
        "ECG-Bench parity score, task {:?}, {} items{}",
        s.task,
        s.n,
        if s.strict { " (strict)" } else { "" }
    );
    if let Some(f1) = s.f1 {
        out!(
            "  F1 {}   AUC(0/1 answers) {}   Hamming loss {}   (x100, one decimal, as the paper prints)",
            pct(Some(f1)),
            pct(s.auc_binary),
            pct(s.hamming_loss)
        );
        for c in &s.classes {
            out!(
                "    {:8} support {:4}  F1 {:.3}  AUC(0/1) {}",
                c.class,
                c.support,
                c.f1,
                c.auc_binary.map_or("nan".into(), |v| format!("{v:.3}"))
            );
        }
        out!("  note: {}", s.auc_kind);
    }
    if let Some(acc) = s.accuracy {
        out!("  accuracy {} ({acc})", pct(Some(acc)));
    }
    if s.unparsable > 0 {
        out!(
            "  {} unparsable answers, {} replaced by seeded random letters (use --strict to count them wrong)",
            s.unparsable,
            s.random_fallbacks
        );
    }
    for n in &s.notes {
        out!("  note: {n}");
    }
    Ok(())
}
