//! The in-memory ECG record every reader produces and every later stage consumes.

use crate::lead::Lead;

/// One channel: raw ADC samples plus what turns them into physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    /// Normalised lead.
    pub lead: Lead,
    /// Description exactly as in the source.
    pub description: String,
    /// ADC units per physical unit.
    pub gain: f64,
    /// ADC value of physical zero (an integer in WFDB headers; EDF's scaling puts it between
    /// integers).
    pub baseline: f64,
    /// Physical units as written (`mV`, `uV`, ...).
    pub units: String,
    /// Raw ADC samples.
    pub adc: Vec<i32>,
    /// ADC value marking a missing sample (physical NaN), if the source format has one.
    pub invalid: Option<i32>,
    /// Stretches read with other ADC parameters than the fields above, in sample order
    /// (the segments of a multi-segment record, each with its own gain, baseline and
    /// format); empty for a record read in one piece.
    pub spans: Vec<Span>,
}

/// From sample `start` on (until the next span), the channel's samples are scaled by these
/// parameters instead of the channel's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// First sample of the stretch.
    pub start: usize,
    /// ADC units per physical unit.
    pub gain: f64,
    /// ADC value of physical zero.
    pub baseline: f64,
    /// ADC value marking a missing sample.
    pub invalid: Option<i32>,
}

impl Channel {
    /// Physical value of sample `k` in the channel's own units, `(adc - baseline) / gain`
    /// computed in f64 exactly as wfdb-python does (with the parameters of the span holding
    /// `k`); NaN for the invalid marker.
    #[inline]
    pub fn physical_at(&self, k: usize) -> f64 {
        let (gain, baseline, invalid) = match self.spans.iter().rev().find(|s| s.start <= k) {
            Some(s) => (s.gain, s.baseline, s.invalid),
            None => (self.gain, self.baseline, self.invalid),
        };
        let a = self.adc[k];
        if Some(a) == invalid {
            f64::NAN
        } else {
            (a as f64 - baseline) / gain
        }
    }

    /// All physical values in the channel's units.
    pub fn physical(&self) -> Vec<f64> {
        self.physical_map(|v| v)
    }

    /// `f` of every physical value (computed as [`Channel::physical`] does), in one pass.
    #[inline]
    fn physical_map<T>(&self, f: impl Fn(f64) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(self.adc.len());
        let mut from = 0;
        let mut params = (self.gain, self.baseline, self.invalid);
        for span in self.spans.iter().chain(std::iter::once(&Span {
            start: self.adc.len(),
            gain: 1.0,
            baseline: 0.0,
            invalid: None,
        })) {
            let to = span.start.min(self.adc.len());
            let (g, b) = (params.0, params.1);
            // Branch-free body so the loop vectorises; the invalid marker becomes NaN by
            // select.
            let inv = params.2.unwrap_or(i32::MIN);
            let has_inv = params.2.is_some();
            out.extend(self.adc[from.min(to)..to].iter().map(|&a| {
                let v = (a as f64 - b) / g;
                f(if has_inv && a == inv { f64::NAN } else { v })
            }));
            from = to;
            params = (span.gain, span.baseline, span.invalid);
        }
        out
    }

    /// Factor turning the channel's units into millivolts (`None` for non-voltage units).
    pub fn mv_factor(&self) -> Option<f64> {
        match self.units.to_ascii_lowercase().as_str() {
            "mv" => Some(1.0),
            "uv" | "µv" => Some(1e-3),
            "v" => Some(1e3),
            "nv" => Some(1e-6),
            _ => None,
        }
    }
}

/// A multi-lead ECG with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Record name (file stem).
    pub name: String,
    /// Sampling frequency in Hz.
    pub fs: f64,
    /// Samples per channel.
    pub n_samples: usize,
    /// Channels in source order.
    pub channels: Vec<Channel>,
    /// Header comments (labels, age, sex ... as free text).
    pub comments: Vec<String>,
    /// Base time/date as written in the header.
    pub base_time: Option<String>,
}

impl Record {
    /// Duration in seconds.
    pub fn duration_s(&self) -> f64 {
        self.n_samples as f64 / self.fs
    }

    /// Lead of each channel, in order.
    pub fn leads(&self) -> Vec<Lead> {
        self.channels.iter().map(|c| c.lead.clone()).collect()
    }

    /// Index of a lead among the channels.
    pub fn channel_index(&self, lead: &Lead) -> Option<usize> {
        self.channels.iter().position(|c| &c.lead == lead)
    }

    /// Physical signal in millivolts, lead-major `[channel][sample]`, as f32 for model input.
    /// Channels in non-voltage units are passed through unscaled.
    pub fn to_mv_f32(&self) -> Vec<Vec<f32>> {
        self.channels
            .iter()
            .map(|c| {
                let f = c.mv_factor().unwrap_or(1.0);
                c.physical_map(|v| (v * f) as f32)
            })
            .collect()
    }

    /// The twelve standard leads in conventional order, in mV, `None` where a lead is absent.
    pub fn standard_12_mv(&self) -> [Option<Vec<f32>>; 12] {
        let all = self.to_mv_f32();
        let mut out: [Option<Vec<f32>>; 12] = Default::default();
        for (c, sig) in self.channels.iter().zip(all) {
            if let Some(i) = c.lead.standard_index()
                && out[i].is_none()
            {
                out[i] = Some(sig);
            }
        }
        out
    }

    /// Value of the first comment of the form `key: value` (key compared case-insensitively,
    /// spaces around the colon ignored): `comment_value("Dx")` reads `#Dx: 59118001`.
    pub fn comment_value(&self, key: &str) -> Option<&str> {
        comment_value(&self.comments, key)
    }
}

/// See [`Record::comment_value`].
pub fn comment_value<'a>(comments: &'a [String], key: &str) -> Option<&'a str> {
    comments.iter().find_map(|c| {
        let (k, v) = c.split_once(':')?;
        k.trim().eq_ignore_ascii_case(key).then_some(v.trim())
    })
}
