//! Signal processing for ECGs: band-limited rational resampling, zero-phase IIR filtering
//! (band-pass, baseline-wander high-pass, powerline notch), per-lead standardisation,
//! crop/pad, lead selection, a Pan-Tompkins QRS detector with heart rate, and clinical
//! perturbations (noise, wander, powerline, electrode motion, lead dropout, ...) for
//! robustness evaluation.
//!
//! Signals are lead-major `&[f32]`/`Vec<f32>` slices in millivolts. The filters are written
//! here (a few dozen lines each, with tests against closed forms) rather than pulled from a
//! DSP crate: we need exact zero-phase `filtfilt` with scipy's edge handling, and the
//! maintained Rust DSP crates do not offer it.

pub mod delineate;
pub mod filter;
pub mod leads;
pub mod perturb;
pub mod qrs;
pub mod resample;

pub use filter::{Biquad, Cascade, bandpass, filtfilt, highpass, lowpass, notch};
pub use leads::{crop_or_pad, select_leads, standardize};
pub use qrs::{QrsConfig, detect_qrs, heart_rate_bpm};
pub use resample::{Resampler, resample};
