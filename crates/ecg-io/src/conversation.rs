//! ECGInstruct / ECG-Bench conversation items (LLaVA format), from JSON arrays or JSON Lines.
//! Both spellings seen in the wild are accepted: `conversations` with `human`/`gpt` turns
//! (LLaVA, ECGInstruct) and `conversation` with `user`/`assistant` (PULSE's evaluation files).

use std::path::Path;

use crate::error::{Error, Result};

/// One turn.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// Speaker as written (`human`, `gpt`, `user`, `assistant`).
    pub from: String,
    /// Text; the image placeholder `<image>` is kept.
    pub value: String,
}

impl Turn {
    /// Whether the model speaks this turn.
    pub fn is_model(&self) -> bool {
        matches!(self.from.as_str(), "gpt" | "assistant" | "model")
    }
}

/// One conversation item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConversationItem {
    /// Item id.
    pub id: String,
    /// Image path relative to an image root, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Turns in order.
    #[serde(alias = "conversation")]
    pub conversations: Vec<Turn>,
}

impl ConversationItem {
    /// (prompt, answer) pairs: each user turn with the model turn that follows it.
    pub fn exchanges(&self) -> Vec<(&str, &str)> {
        self.conversations
            .windows(2)
            .filter(|w| !w[0].is_model() && w[1].is_model())
            .map(|w| (w[0].value.as_str(), w[1].value.as_str()))
            .collect()
    }
}

/// Read a `.json` array or a `.jsonl` file of conversation items. An item that does not
/// parse is an error naming its index (JSON) or line (JSONL).
pub fn read_conversations(path: &Path) -> Result<Vec<ConversationItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().and_then(|e| e.to_str()) == Some("jsonl")
        || !text.trim_start().starts_with('[');
    if jsonl {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push(serde_json::from_str(line).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?);
        }
        Ok(out)
    } else {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                line: 0,
                source,
            })?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value(v).map_err(|e| Error::Table {
                    path: path.to_path_buf(),
                    row: i,
                    field: "item".into(),
                    what: e.to_string(),
                })
            })
            .collect()
    }
}
