//! WFDB annotation files in MIT format (`.atr`): 16-bit little-endian words whose top six
//! bits are a code and low ten bits a time step, with pseudo-codes for long skips, numbers,
//! subtypes, channels and auxiliary text (annot(5) in the WFDB manual).

use std::path::Path;

use crate::error::{Error, Result};

/// One annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    /// Sample index.
    pub sample: u64,
    /// Annotation code (1 = normal beat, 28 = rhythm change, ...).
    pub code: u8,
    /// Subtype field.
    pub subtype: i8,
    /// Channel field.
    pub chan: u8,
    /// Number field.
    pub num: i8,
    /// Auxiliary text (rhythm annotations carry `(AFIB`, `(N` ...), trailing NULs removed.
    pub aux: String,
}

impl Annotation {
    /// The one-character mnemonic of the code, as WFDB prints it.
    pub fn symbol(&self) -> &'static str {
        symbol(self.code)
    }

    /// Whether the code marks a QRS complex (WFDB's `isqrs`).
    pub fn is_beat(&self) -> bool {
        is_beat(self.code)
    }
}

const SYMBOLS: [&str; 50] = [
    " ", "N", "L", "R", "a", "V", "F", "J", "A", "S", "E", "j", "/", "Q", "~", "", "|", "", "s",
    "T", "*", "D", "\"", "=", "p", "B", "^", "t", "+", "u", "?", "!", "[", "]", "e", "n", "@", "x",
    "f", "(", ")", "r", "", "", "", "", "", "", "", "",
];

/// Mnemonic of an annotation code (empty for unassigned codes).
pub fn symbol(code: u8) -> &'static str {
    SYMBOLS.get(code as usize).copied().unwrap_or("")
}

/// WFDB's `isqrs` table: the codes that are beats.
pub fn is_beat(code: u8) -> bool {
    matches!(code, 1..=13 | 25 | 30 | 34 | 35 | 37 | 38 | 41)
}

const SKIP: u16 = 59;
const NUM: u16 = 60;
const SUB: u16 = 61;
const CHN: u16 = 62;
const AUX: u16 = 63;

/// Read an MIT-format annotation file.
pub fn read_annotations(path: &Path) -> Result<Vec<Annotation>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_annotations(&bytes, path)
}

/// Parse MIT-format annotation bytes; `path` names the file in errors.
///
/// As WFDB and wfdb-python read them: a SKIP's signed interval adds to the next annotation's
/// time (it may step back, as long as no annotation lands before sample 0); NUM and CHN
/// carry over to later annotations, SUB and AUX do not; codes 42-58 (no standard mnemonic)
/// are annotations like any other. Not returned, as wfdb-python's `rdann` drops them: code 0
/// (`NOTANN`, also a zero word inside the file) and NOTE annotations at sample 0, which hold
/// the file's definitions (`## time resolution: ...`, custom labels).
pub fn parse_annotations(bytes: &[u8], path: &Path) -> Result<Vec<Annotation>> {
    let mut out: Vec<Annotation> = Vec::new();
    let mut pos = 0usize;
    let mut time: i64 = 0;
    let (mut num, mut chan) = (0i8, 0u8);
    let err = |index: usize, byte: usize, what: &str| Error::Annotation {
        path: path.to_path_buf(),
        index,
        byte: byte as u64,
        what: what.to_string(),
    };
    loop {
        if pos + 2 > bytes.len() {
            // Files normally end with a zero word; a missing terminator after whole
            // annotations is tolerated, half a word is not.
            if pos == bytes.len() {
                break;
            }
            return Err(err(out.len(), pos, "file ends inside a 16-bit word"));
        }
        let w = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
        pos += 2;
        let (a, i) = (w >> 10, w & 0x3FF);
        match a {
            // The terminating zero word (the file's last).
            0 if i == 0 && pos == bytes.len() => break,
            SKIP => {
                if pos + 4 > bytes.len() {
                    return Err(err(out.len(), pos, "SKIP without its 32-bit interval"));
                }
                // PDP-11 order: high 16 bits first, each half little-endian.
                let hi = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) as u32;
                let lo = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]) as u32;
                let skip = ((hi << 16) | lo) as i32;
                pos += 4;
                time += skip as i64;
            }
            NUM => match out.last_mut() {
                Some(last) => {
                    last.num = i as i8;
                    num = last.num;
                }
                None => return Err(err(0, pos - 2, "NUM before any annotation")),
            },
            SUB => match out.last_mut() {
                Some(last) => last.subtype = i as i8,
                None => return Err(err(0, pos - 2, "SUB before any annotation")),
            },
            CHN => match out.last_mut() {
                Some(last) => {
                    last.chan = i as u8;
                    chan = last.chan;
                }
                None => return Err(err(0, pos - 2, "CHN before any annotation")),
            },
            AUX => {
                let len = i as usize;
                let padded = len + (len & 1);
                if pos + padded > bytes.len() {
                    return Err(err(
                        out.len(),
                        pos,
                        "AUX text runs past the end of the file",
                    ));
                }
                let text = String::from_utf8_lossy(&bytes[pos..pos + len])
                    .trim_end_matches('\0')
                    .to_string();
                pos += padded;
                match out.last_mut() {
                    Some(last) => last.aux = text,
                    None => return Err(err(0, pos, "AUX before any annotation")),
                }
            }
            _ => {
                time += i as i64;
                let sample = u64::try_from(time).map_err(|_| {
                    err(
                        out.len(),
                        pos - 2,
                        &format!("annotation at sample {time}, before 0"),
                    )
                })?;
                // num and chan carry over from the previous annotation unless set again.
                out.push(Annotation {
                    sample,
                    code: a as u8,
                    subtype: 0,
                    chan,
                    num,
                    aux: String::new(),
                });
            }
        }
    }
    out.retain(|a| a.code != 0 && !(a.code == NOTE && a.sample == 0));
    Ok(out)
}

/// The NOTE code (`"`): at sample 0 it carries the file's definitions.
const NOTE: u8 = 22;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_skip_and_aux() {
        // N at 5, SKIP +100000, V at +3 with aux "(AFIB" (odd length -> padded), end.
        let mut b: Vec<u8> = Vec::new();
        let word = |a: u16, i: u16| ((a << 10) | i).to_le_bytes();
        b.extend(word(1, 5));
        b.extend(word(59, 0));
        let skip: u32 = 100_000;
        b.extend(((skip >> 16) as u16).to_le_bytes());
        b.extend((skip as u16).to_le_bytes());
        b.extend(word(5, 3));
        b.extend(word(63, 5));
        b.extend(b"(AFIB\0");
        b.extend([0, 0]);
        let a = parse_annotations(&b, Path::new("x.atr")).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].sample, a[0].symbol()), (5, "N"));
        assert_eq!(
            (a[1].sample, a[1].symbol(), a[1].aux.as_str()),
            (100_008, "V", "(AFIB")
        );
        assert!(a[0].is_beat() && a[1].is_beat());
    }

    #[test]
    fn truncated_is_an_error() {
        let e = parse_annotations(&[0x05, 0x04, 0x07], Path::new("x.atr")).unwrap_err();
        assert!(matches!(e, Error::Annotation { index: 1, .. }), "{e}");
        let e = parse_annotations(&((63u16 << 10) | 9).to_le_bytes(), Path::new("x.atr"));
        assert!(e.is_err());
    }
}
