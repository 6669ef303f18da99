//! Lead names. Sources spell the twelve standard leads differently (`AVR`, `aVR`, `avr`); we
//! normalise them to one enum and keep any other channel (MIT-BIH `MLII`, Frank `vx`) by name.

use std::fmt;

/// One ECG channel: a standard 12-lead lead, or another named channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lead {
    /// Limb lead I.
    I,
    /// Limb lead II.
    II,
    /// Limb lead III.
    III,
    /// Augmented lead aVR.
    AVR,
    /// Augmented lead aVL.
    AVL,
    /// Augmented lead aVF.
    AVF,
    /// Precordial V1.
    V1,
    /// Precordial V2.
    V2,
    /// Precordial V3.
    V3,
    /// Precordial V4.
    V4,
    /// Precordial V5.
    V5,
    /// Precordial V6.
    V6,
    /// Any other channel, by its name in the header.
    Other(String),
}

impl Lead {
    /// The twelve standard leads in the conventional order I, II, III, aVR, aVL, aVF, V1-V6.
    pub const STANDARD_12: [Lead; 12] = [
        Lead::I,
        Lead::II,
        Lead::III,
        Lead::AVR,
        Lead::AVL,
        Lead::AVF,
        Lead::V1,
        Lead::V2,
        Lead::V3,
        Lead::V4,
        Lead::V5,
        Lead::V6,
    ];

    /// Parse a header description; case and surrounding spaces are ignored for the standard
    /// leads. Anything else becomes [`Lead::Other`] with the text unchanged.
    pub fn parse(name: &str) -> Lead {
        let t = name.trim();
        match t.to_ascii_uppercase().as_str() {
            "I" => Lead::I,
            "II" => Lead::II,
            "III" => Lead::III,
            "AVR" => Lead::AVR,
            "AVL" => Lead::AVL,
            "AVF" => Lead::AVF,
            "V1" => Lead::V1,
            "V2" => Lead::V2,
            "V3" => Lead::V3,
            "V4" => Lead::V4,
            "V5" => Lead::V5,
            "V6" => Lead::V6,
            _ => Lead::Other(t.to_string()),
        }
    }

    /// Position in [`Lead::STANDARD_12`], `None` for other channels.
    pub fn standard_index(&self) -> Option<usize> {
        Lead::STANDARD_12.iter().position(|l| l == self)
    }

    /// Conventional spelling (`aVR`, `V1`, ...).
    pub fn name(&self) -> &str {
        match self {
            Lead::I => "I",
            Lead::II => "II",
            Lead::III => "III",
            Lead::AVR => "aVR",
            Lead::AVL => "aVL",
            Lead::AVF => "aVF",
            Lead::V1 => "V1",
            Lead::V2 => "V2",
            Lead::V3 => "V3",
            Lead::V4 => "V4",
            Lead::V5 => "V5",
            Lead::V6 => "V6",
            Lead::Other(s) => s,
        }
    }
}

impl fmt::Display for Lead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_normalise() {
        for s in ["AVR", "aVR", "avr", " aVr "] {
            assert_eq!(Lead::parse(s), Lead::AVR);
        }
        assert_eq!(Lead::parse("v6"), Lead::V6);
        assert_eq!(Lead::parse("MLII"), Lead::Other("MLII".into()));
        assert_eq!(Lead::AVL.standard_index(), Some(4));
        assert_eq!(Lead::parse("vx").standard_index(), None);
    }
}
