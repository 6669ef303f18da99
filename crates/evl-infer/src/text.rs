//! Tokenizers and conversations. Teacher and student get their own byte-pair-encoding
//! tokenizers, trained here with the `tokenizers` crate (no hub features) at different
//! vocabulary sizes, so the same answer has a different number of tokens for each model.
//! Conversations are generated from labelled records with ECGInstruct-style templates whose
//! answers the ECG-Bench scorer parses (label names verbatim, `Answer: X` for choices).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::decoders::bpe::BPEDecoder;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use crate::{Error, Result};

/// Special tokens, in id order 0..4.
pub const SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<sep>", "<eos>"];
/// Padding id.
pub const PAD: i64 = 0;
/// Begin-of-sequence id.
pub const BOS: i64 = 1;
/// Prompt/answer separator id.
pub const SEP: i64 = 2;
/// End-of-sequence id.
pub const EOS: i64 = 3;

/// The suffix that marks a word's last piece in the trained vocabularies.
const WORD_END: &str = "</w>";

/// A trained tokenizer with the ids the models use.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(vocab {})", self.vocab_size())
    }
}

impl TextTokenizer {
    /// Train a BPE tokenizer of (at most) `vocab` tokens on `texts`: the same texts give the
    /// same tokenizer, ids included, on every run.
    ///
    /// Our own trainer, not `tokenizers`' `BpeTrainer`: that one numbers the initial alphabet
    /// in hash-map order and breaks ties between equally frequent pairs by those ids, so two
    /// runs on the same texts gave different ids and different merges (measured: 30 of 156
    /// ids and the merge list differed between two identical tiny quickstarts), and with them
    /// different models. Here the specials come first, then the alphabet in string order,
    /// then each merge's token in merge order; the most frequent pair is merged first, ties
    /// going to the smallest pair in string order. Words are split by the same `Whitespace`
    /// pre-tokenizer the tokenizer encodes with, and `tokenizers` does the encoding,
    /// decoding and `tokenizer.json`.
    pub fn train(texts: &[String], vocab: usize) -> Result<TextTokenizer> {
        use std::collections::{BTreeMap, BTreeSet, HashMap};
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let tk = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        // Word counts, each word as symbols with the word-end mark on its last.
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for text in texts {
            let mut pre = PreTokenizedString::from(text.as_str());
            Whitespace {}.pre_tokenize(&mut pre).map_err(tk)?;
            for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                *counts.entry(word.to_string()).or_default() += 1;
            }
        }
        let mut words: Vec<(Vec<String>, u64)> = counts
            .into_iter()
            .map(|(w, n)| {
                let chars: Vec<char> = w.chars().collect();
                let last = chars.len() - 1;
                let symbols = chars
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if i == last {
                            format!("{c}{WORD_END}")
                        } else {
                            c.to_string()
                        }
                    })
                    .collect();
                (symbols, n)
            })
            .collect();
        let mut ids: HashMap<String, u32> = HashMap::new();
        let add = |t: &str, ids: &mut HashMap<String, u32>| {
            let next = ids.len() as u32;
            ids.entry(t.to_string()).or_insert(next);
        };
        for sp in SPECIALS {
            add(sp, &mut ids);
        }
        let alphabet: BTreeSet<&String> = words.iter().flat_map(|(w, _)| w.iter()).collect();
        for t in alphabet {
            add(t, &mut ids);
        }
        let mut merges: Vec<(String, String)> = Vec::new();
        while ids.len() < vocab {
            let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
            for (w, n) in &words {
                for p in w.windows(2) {
                    *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += n;
                }
            }
            // Most frequent first; among equals the first in string order (BTreeMap order,
            // kept by max_by's last-wins rule through the reversed iteration).
            let Some(((l, r), _)) = pairs.iter().rev().max_by_key(|(_, n)| **n) else {
                break;
            };
            let (l, r) = (l.to_string(), r.to_string());
            let joined = format!("{l}{r}");
            for (w, _) in &mut words {
                let mut i = 0;
                while i + 1 < w.len() {
                    if w[i] == l && w[i + 1] == r {
                        w[i] = joined.clone();
                        w.remove(i + 1);
                    }
                    i += 1;
                }
            }
            add(&joined, &mut ids);
            merges.push((l, r));
        }
        let model = BPE::builder()
            .vocab_and_merges(
                ids.into_iter().collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .end_of_word_suffix(WORD_END.into())
            .build()
            .map_err(tk)?;
        let mut tok: TokenizerImpl<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerBuilder::new()
            .with_model(model.into())
            .with_pre_tokenizer(Some(Whitespace {}.into()))
            .with_normalizer(None)
            .with_post_processor(None)
            .with_decoder(Some(BPEDecoder::new(WORD_END.into()).into()))
            .build()
            .map_err(tk)?;
        let specials: Vec<AddedToken> = SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        tok.add_special_tokens(&specials);
        let inner = Tokenizer::from(tok);
        Ok(TextTokenizer { inner })
    }

    /// Load from a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<TextTokenizer> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        if inner.get_decoder().is_none() {
            return Err(Error::Tokenizer(format!(
                "{}: field `decoder` is null, so split words would decode letter by letter \
                 (\"N O R M\") and no answer would parse; this tokenizer was written by an \
                 evl-ecg before word-end markers: retrain the model",
                path.display()
            )));
        }
        Ok(TextTokenizer { inner })
    }

    /// Save as `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token strings by id.
    pub fn vocab(&self) -> Vec<String> {
        let mut v = vec![String::new(); self.vocab_size()];
        for (t, i) in self.inner.get_vocab(true) {
            if let Some(slot) = v.get_mut(i as usize) {
                *slot = t;
            }
        }
        v
    }

    /// Ids and character offsets of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> (Vec<i64>, Vec<(usize, usize)>) {
        match self.inner.encode(text, false) {
            Ok(enc) => (
                enc.get_ids().iter().map(|&i| i as i64).collect(),
                enc.get_offsets().to_vec(),
            ),
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    /// Text of ids: a word's pieces joined, words separated by one space, punctuation
    /// re-attached (the whitespace pre-tokenizer made it a word of its own).
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&i| i > EOS)
            .map(|&i| i as u32)
            .collect();
        self.inner
            .decode(&ids, true)
            .unwrap_or_default()
            .replace(" ,", ",")
            .replace(" .", ".")
            .replace(" :", ":")
    }
}

/// A prompt with its answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// Question.
    pub prompt: String,
    /// Answer.
    pub answer: String,
    /// Template name.
    pub template: String,
}

/// The label space the built-in conversations and models use: the PTB-XL superclasses.
pub fn superclass_space() -> Vec<String> {
    ecg_synth::SUPERCLASSES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The superclass diagnosis prompt (answer: label names, comma separated, in label order).
pub const DIAGNOSIS_PROMPT: &str =
    "Which diagnostic superclasses does this ECG show? Options: NORM, MI, STTC, CD, HYP.";

/// The verification prompt for one label (answer `yes` or `no`); its `yes` probability is the
/// model's per-label probability.
pub fn verify_prompt(label: &str) -> String {
    format!("Does this ECG show {label}? Answer yes or no.")
}

/// Conversations for one record: the diagnosis question, a verification question per label
/// (balanced between present and absent labels), a rhythm question, and an 8-option multiple
/// choice question.
pub fn conversations(
    labels: &[String],
    findings: &[String],
    space: &[String],
    seed: u64,
) -> Vec<Turn> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let present: Vec<&String> = space.iter().filter(|l| labels.contains(l)).collect();
    out.push(Turn {
        prompt: DIAGNOSIS_PROMPT.to_string(),
        answer: present
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        template: "diagnosis".into(),
    });
    for l in space {
        let yes = labels.contains(l);
        out.push(Turn {
            prompt: verify_prompt(l),
            answer: if yes { "yes" } else { "no" }.into(),
            template: "verify".into(),
        });
    }
    let rhythm = findings
        .iter()
        .find(|f| ["SR", "SBRAD", "STACH", "AF"].contains(&f.as_str()))
        .cloned()
        .unwrap_or_else(|| "SR".into());
    out.push(Turn {
        prompt: "What is the rhythm? Options: SR, SBRAD, STACH, AF.".into(),
        answer: rhythm,
        template: "rhythm".into(),
    });
    // 8-option multiple choice over single superclasses and pairs.
    if let Some(first) = present.first() {
        let letters = ["A", "B", "C", "D", "E", "F", "G", "H"];
        let mut options: Vec<String> = space.to_vec();
        options.extend(
            ["MI, STTC", "CD, HYP", "STTC, HYP"]
                .iter()
                .map(|s| s.to_string()),
        );
        let correct_text = present
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut idx: Vec<usize> = (0..options.len()).collect();
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.random_range(0..=i));
        }
        let shown: Vec<&String> = idx.iter().map(|&i| &options[i]).collect();
        if let Some(pos) = shown
            .iter()
            .position(|o| **o == correct_text)
            .or_else(|| shown.iter().position(|o| o == first))
        {
            let listing: Vec<String> = shown
                .iter()
                .enumerate()
                .map(|(i, o)| format!("{}. {o}", letters[i]))
                .collect();
            out.push(Turn {
                prompt: format!("Which option fits best? {}", listing.join(" ")),
                answer: format!("Answer: {}", letters[pos]),
                template: "choice".into(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids, hand-worked: specials, then the alphabet in string order, then merges by
    /// count with ties to the smallest pair; and the same tokenizer on every training.
    #[test]
    fn training_is_deterministic_and_ordered() {
        let texts: Vec<String> = vec!["ba bc".into(), "dd dd de".into()];
        // Words: ba 1, bc 1, dd 2, de 1. Alphabet: a</w> b c</w> d d</w> e</w>.
        // Pairs: (b,a</w>) 1, (b,c</w>) 1, (d,d</w>) 2, (d,e</w>) 1 -> dd</w> first, then
        // the tie between the three count-1 pairs goes to (b, a</w>).
        let tok = TextTokenizer::train(&texts, 12).unwrap();
        let v = tok.vocab();
        let want = [
            "<pad>", "<bos>", "<sep>", "<eos>", "a</w>", "b", "c</w>", "d", "d</w>", "e</w>",
            "dd</w>", "ba</w>",
        ];
        assert_eq!(v, want);
        let (ids, _) = tok.encode("ba dd bc");
        assert_eq!(ids, vec![11, 10, 5, 6]);
        let json = |t: &TextTokenizer| t.inner.to_string(false).unwrap();
        for _ in 0..5 {
            assert_eq!(json(&TextTokenizer::train(&texts, 12).unwrap()), json(&tok));
        }
    }

    /// Answers must read as written, whatever the vocabulary size: a small vocabulary splits
    /// label names into several tokens, and decoding must put them back together.
    #[test]
    fn decoded_answers_read_as_written() {
        let space = superclass_space();
        let mut texts = Vec::new();
        for (i, l) in space.iter().enumerate() {
            for t in conversations(std::slice::from_ref(l), &["SR".into()], &space, i as u64) {
                texts.push(t.prompt);
                texts.push(t.answer);
            }
        }
        for vocab in [60, 90, 400] {
            let tok = TextTokenizer::train(&texts, vocab).unwrap();
            for s in [
                "NORM",
                "MI, STTC, HYP",
                "yes",
                "no",
                "Answer: B",
                "sinus rhythm. CD",
            ] {
                let (ids, _) = tok.encode(s);
                assert_eq!(tok.decode(&ids), s, "vocab {vocab}: ids {ids:?}");
            }
            // The small vocabularies do split words (or the test would not test joining).
            if vocab == 60 {
                assert!(tok.encode("NORM").0.len() > 1);
            }
        }
    }

    #[test]
    fn tokenizer_without_decoder_is_refused() {
        let texts: Vec<String> = ["NORM MI STTC", "yes no"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let tok = TextTokenizer::train(&texts, 40).unwrap();
        let dir = std::env::temp_dir().join(format!("evl-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        tok.save(&path).unwrap();
        assert!(TextTokenizer::load(&path).is_ok());
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["decoder"] = serde_json::Value::Null;
        std::fs::write(&path, json.to_string()).unwrap();
        let err = TextTokenizer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("decoder"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
