//! Label spaces and the tables that map source codes onto them.

pub mod ptbxl;
pub mod snomed;

/// A named, ordered set of labels (the columns of a multi-hot label vector).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabelSpace {
    /// Name of the space (`ptbxl-super`, `cpsc2018`, ...).
    pub name: String,
    /// Label names, in column order.
    pub labels: Vec<String>,
}

impl LabelSpace {
    /// Build a space from names.
    pub fn new(name: &str, labels: &[&str]) -> LabelSpace {
        LabelSpace {
            name: name.to_string(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The PTB-XL diagnostic superclasses, in the order of the PTB-XL benchmark.
    pub fn ptbxl_super() -> LabelSpace {
        LabelSpace::new("ptbxl-super", &["NORM", "MI", "STTC", "CD", "HYP"])
    }

    /// The nine CPSC-2018 classes as ECG-Bench names them.
    pub fn cpsc2018() -> LabelSpace {
        LabelSpace::new(
            "cpsc2018",
            &[
                "NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE",
            ],
        )
    }

    /// The CODE-15% abnormality labels ECG-Bench scores.
    pub fn code15() -> LabelSpace {
        LabelSpace::new("code15", &["1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"])
    }

    /// Column of a label.
    pub fn index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    /// Multi-hot vector of `labels` (labels outside the space are ignored and returned).
    pub fn encode<'a>(&self, labels: impl IntoIterator<Item = &'a str>) -> (Vec<u8>, Vec<String>) {
        let mut v = vec![0u8; self.labels.len()];
        let mut unknown = Vec::new();
        for l in labels {
            match self.index(l) {
                Some(i) => v[i] = 1,
                None => unknown.push(l.to_string()),
            }
        }
        (v, unknown)
    }
}
