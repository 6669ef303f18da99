//! WFDB sample storage formats: decoding a byte stream of interleaved samples into integers and
//! encoding back. The formats are small bit-packing rules (signal(5) in the WFDB manual); no
//! maintained Rust crate decodes all of them, so they live here with known-answer tests.

/// Formats this module decodes and encodes. Format 8 stores first differences: [`decode`]
/// returns the differences, and the record reader adds them up from the header's initial
/// value (as WFDB and wfdb-python do).
pub const SUPPORTED: [u32; 10] = [16, 212, 80, 24, 32, 61, 310, 311, 8, 160];

/// The null format: a signal with no stored samples (every sample missing, NaN), read
/// without a file.
pub const NULL: u32 = 0;

/// WFDB's FLAC formats (508, 516, 524: at most 8, 16, 24 bits), read by
/// [`super::flac`], never written.
pub const FLAC: [u32; 3] = [508, 516, 524];

/// Whether `format` is a FLAC format.
pub fn is_flac(format: u32) -> bool {
    FLAC.contains(&format)
}

/// Whether records in `format` are read ([`decode`], or [`super::flac`] for FLAC).
pub fn is_supported(format: u32) -> bool {
    SUPPORTED.contains(&format) || is_flac(format)
}

/// The value a format uses to mark a missing sample (WFDB's "invalid sample"); physical
/// values of these samples are NaN. Format 8 (differences) has none.
pub fn invalid_value(format: u32) -> Option<i32> {
    match format {
        8 => None,
        NULL => Some(i32::MIN),
        80 | 508 => Some(-128),
        212 => Some(-2048),
        310 | 311 => Some(-512),
        24 | 524 => Some(-(1 << 23)),
        32 => Some(i32::MIN),
        _ => Some(-32768),
    }
}

/// Inclusive range of values a format stores (for format 8, of each difference).
pub fn value_range(format: u32) -> (i64, i64) {
    match format {
        8 | 80 => (-128, 127),
        212 => (-2048, 2047),
        310 | 311 => (-512, 511),
        24 => (-(1 << 23), (1 << 23) - 1),
        32 => (i32::MIN as i64, i32::MAX as i64),
        _ => (-32768, 32767),
    }
}

/// Bytes needed to store `n` samples (the packed formats round up to whole bytes).
pub fn bytes_for(format: u32, n: u64) -> u64 {
    match format {
        8 | 80 => n,
        16 | 61 | 160 => 2 * n,
        24 => 3 * n,
        32 => 4 * n,
        212 => (3 * n).div_ceil(2),
        310 => (n / 3) * 4 + [0, 2, 4][(n % 3) as usize],
        311 => (n / 3) * 4 + [0, 2, 3][(n % 3) as usize],
        _ => 0,
    }
}

/// Whole samples that `bytes` bytes hold.
pub fn samples_in(format: u32, bytes: u64) -> u64 {
    match format {
        8 | 80 => bytes,
        16 | 61 | 160 => bytes / 2,
        24 => bytes / 3,
        32 => bytes / 4,
        212 => (2 * bytes) / 3,
        310 => (bytes / 4) * 3 + [0, 0, 1, 1][(bytes % 4) as usize],
        311 => (bytes / 4) * 3 + [0, 0, 1, 2][(bytes % 4) as usize],
        _ => 0,
    }
}

fn sext(v: u32, bits: u32) -> i32 {
    let shift = 32 - bits;
    ((v << shift) as i32) >> shift
}

/// Decode `n` consecutive samples in `format` from `bytes` into `out` (cleared first).
///
/// # Panics
/// If `bytes` is shorter than [`bytes_for`]`(format, n)` or the format is unsupported; callers
/// check both first and turn them into errors.
pub fn decode(format: u32, bytes: &[u8], n: usize, out: &mut Vec<i32>) {
    assert!(
        bytes.len() as u64 >= bytes_for(format, n as u64),
        "caller checks the length"
    );
    out.clear();
    out.reserve(n);
    match format {
        16 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i32),
        ),
        61 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]) as i32),
        ),
        80 => out.extend(bytes[..n].iter().map(|&b| b as i32 - 128)),
        8 => out.extend(bytes[..n].iter().map(|&b| b as i8 as i32)),
        160 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i32 - 32768),
        ),
        24 => out.extend(
            bytes[..3 * n]
                .chunks_exact(3)
                .map(|c| sext(c[0] as u32 | (c[1] as u32) << 8 | (c[2] as u32) << 16, 24)),
        ),
        32 => out.extend(
            bytes[..4 * n]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        212 => {
            for k in 0..n {
                let base = (k / 2) * 3;
                let v = if k % 2 == 0 {
                    bytes[base] as u32 | ((bytes[base + 1] as u32 & 0x0F) << 8)
                } else {
                    bytes[base + 2] as u32 | ((bytes[base + 1] as u32 & 0xF0) << 4)
                };
                out.push(sext(v, 12));
            }
        }
        310 => {
            for k in 0..n {
                let base = (k / 3) * 4;
                let w = |i: usize| -> u32 {
                    let lo = bytes.get(base + 2 * i).copied().unwrap_or(0) as u32;
                    let hi = bytes.get(base + 2 * i + 1).copied().unwrap_or(0) as u32;
                    lo | hi << 8
                };
                let v = match k % 3 {
                    0 => (w(0) >> 1) & 0x3FF,
                    1 => (w(1) >> 1) & 0x3FF,
                    _ => ((w(0) >> 11) & 0x1F) | (((w(1) >> 11) & 0x1F) << 5),
                };
                out.push(sext(v, 10));
            }
        }
        311 => {
            for k in 0..n {
                let base = (k / 3) * 4;
                let mut w = 0u32;
                for i in 0..4 {
                    w |= (bytes.get(base + i).copied().unwrap_or(0) as u32) << (8 * i);
                }
                out.push(sext((w >> (10 * (k % 3) as u32)) & 0x3FF, 10));
            }
        }
        other => panic!("format {other} is not supported; callers check is_supported"),
    }
}

/// Encode samples in `format`. Values outside [`value_range`] are the caller's error (checked
/// by the record writer); here they are truncated to the format's bits.
pub fn encode(format: u32, samples: &[i32]) -> Vec<u8> {
    let n = samples.len();
    let mut out = vec![0u8; bytes_for(format, n as u64) as usize];
    match format {
        16 => {
            for (c, &v) in out.chunks_exact_mut(2).zip(samples) {
                c.copy_from_slice(&(v as i16).to_le_bytes());
            }
        }
        61 => {
            for (c, &v) in out.chunks_exact_mut(2).zip(samples) {
                c.copy_from_slice(&(v as i16).to_be_bytes());
            }
        }
        80 => {
            for (b, &v) in out.iter_mut().zip(samples) {
                *b = (v + 128) as u8;
            }
        }
        8 => {
            for (b, &v) in out.iter_mut().zip(samples) {
                *b = v as i8 as u8;
            }
        }
        160 => {
            for (c, &v) in out.chunks_exact_mut(2).zip(samples) {
                c.copy_from_slice(&((v + 32768) as u16).to_le_bytes());
            }
        }
        24 => {
            for (c, &v) in out.chunks_exact_mut(3).zip(samples) {
                c.copy_from_slice(&v.to_le_bytes()[..3]);
            }
        }
        32 => {
            for (c, &v) in out.chunks_exact_mut(4).zip(samples) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        212 => {
            for (k, &v) in samples.iter().enumerate() {
                let v = (v as u32) & 0xFFF;
                let base = (k / 2) * 3;
                if k % 2 == 0 {
                    out[base] = v as u8;
                    out[base + 1] = (out[base + 1] & 0xF0) | (v >> 8) as u8;
                } else {
                    out[base + 2] = v as u8;
                    out[base + 1] = (out[base + 1] & 0x0F) | ((v >> 8) << 4) as u8;
                }
            }
        }
        310 => {
            for (g, chunk) in samples.chunks(3).enumerate() {
                let v = |i: usize| chunk.get(i).map_or(0u32, |&x| (x as u32) & 0x3FF);
                let w0 = (v(0) << 1) | ((v(2) & 0x1F) << 11);
                let w1 = (v(1) << 1) | ((v(2) >> 5) << 11);
                let bytes = [w0 as u8, (w0 >> 8) as u8, w1 as u8, (w1 >> 8) as u8];
                let base = g * 4;
                let len = out.len().min(base + 4) - base;
                out[base..base + len].copy_from_slice(&bytes[..len]);
            }
        }
        311 => {
            for (g, chunk) in samples.chunks(3).enumerate() {
                let mut w = 0u32;
                for (i, &x) in chunk.iter().enumerate() {
                    w |= ((x as u32) & 0x3FF) << (10 * i);
                }
                let bytes = w.to_le_bytes();
                let base = g * 4;
                let len = out.len().min(base + 4) - base;
                out[base..base + len].copy_from_slice(&bytes[..len]);
            }
        }
        other => panic!("format {other} is not supported; callers check is_supported"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers: the 212 bytes are what wfdb-python 4.3.1 writes for the interleaved
    // samples below (two signals, three frames) with
    // `wfdb.wrsamp('t', 100, ['mV']*2, ['a','b'], d_signal=np.array([[1,-2],[2047,-2048],
    // [300,-300]]), fmt=['212']*2, adc_gain=[1,1], baseline=[0,0])`. wfdb-python cannot write
    // 310/311; the 310/311 words below were read back by its `rdrecord` as [1, -2, 300].
    const SAMPLES: [i32; 6] = [1, -2, 2047, -2048, 300, -300];

    /// WFDB's invalid-sample values and ranges (wfdb-python 4.3.1's `INVALID_SAMPLE_VALUE`
    /// and the formats' bit widths).
    #[test]
    fn known_markers_and_ranges() {
        let table: [(u32, Option<i32>, (i64, i64)); 13] = [
            (8, None, (-128, 127)),
            (16, Some(-32768), (-32768, 32767)),
            (61, Some(-32768), (-32768, 32767)),
            (160, Some(-32768), (-32768, 32767)),
            (80, Some(-128), (-128, 127)),
            (212, Some(-2048), (-2048, 2047)),
            (310, Some(-512), (-512, 511)),
            (311, Some(-512), (-512, 511)),
            (24, Some(-8_388_608), (-8_388_608, 8_388_607)),
            (32, Some(i32::MIN), (i32::MIN as i64, i32::MAX as i64)),
            (508, Some(-128), (-128, 127)),
            (516, Some(-32768), (-32768, 32767)),
            (524, Some(-8_388_608), (-8_388_608, 8_388_607)),
        ];
        for (f, inv, range) in table {
            assert_eq!(invalid_value(f), inv, "format {f}");
            if !is_flac(f) {
                assert_eq!(value_range(f), range, "format {f}");
            }
            assert!(is_supported(f), "format {f}");
        }
        assert!(!is_supported(500) && !is_supported(17));
        // Format 0 is read (all missing) but has no sample encoding.
        assert!(!is_supported(NULL));
        assert_eq!(invalid_value(NULL), Some(i32::MIN));
    }

    #[test]
    fn known_answer_212() {
        let bytes = [0x01, 0xF0, 0xFE, 0xFF, 0x87, 0x00, 0x2C, 0xE1, 0xD4];
        let mut out = Vec::new();
        decode(212, &bytes, 6, &mut out);
        assert_eq!(out, SAMPLES);
        assert_eq!(encode(212, &SAMPLES), bytes);
    }

    #[test]
    fn known_answer_16_61_24_32_80() {
        let mut out = Vec::new();
        let le16: Vec<u8> = SAMPLES
            .iter()
            .flat_map(|v| (*v as i16).to_le_bytes())
            .collect();
        decode(16, &le16, 6, &mut out);
        assert_eq!(out, SAMPLES);
        let be16: Vec<u8> = SAMPLES
            .iter()
            .flat_map(|v| (*v as i16).to_be_bytes())
            .collect();
        decode(61, &be16, 6, &mut out);
        assert_eq!(out, SAMPLES);
        // 24-bit: -2 = FE FF FF
        decode(24, &[0xFE, 0xFF, 0xFF, 0x01, 0, 0], 2, &mut out);
        assert_eq!(out, [-2, 1]);
        decode(80, &[0, 128, 255], 3, &mut out);
        assert_eq!(out, [-128, 0, 127]);
        decode(32, &(-70000i32).to_le_bytes(), 1, &mut out);
        assert_eq!(out, [-70000]);
    }

    #[test]
    fn known_answer_310_311() {
        // 10-bit values 1, -2, 300 -> (311) w = 1 | (0x3FE << 10) | (300 << 20)
        let w: u32 = 1 | (0x3FE << 10) | (300 << 20);
        let mut out = Vec::new();
        decode(311, &w.to_le_bytes(), 3, &mut out);
        assert_eq!(out, [1, -2, 300]);
        // 310: w0 = 1<<1 | (300 & 31)<<11, w1 = 0x3FE<<1 | (300>>5)<<11
        let w0: u32 = (1 << 1) | ((300 & 31) << 11);
        let w1: u32 = (0x3FE << 1) | ((300 >> 5) << 11);
        let b = [w0 as u8, (w0 >> 8) as u8, w1 as u8, (w1 >> 8) as u8];
        decode(310, &b, 3, &mut out);
        assert_eq!(out, [1, -2, 300]);
    }

    #[test]
    fn round_trip_all_formats_and_lengths() {
        for &f in &SUPPORTED {
            let (lo, hi) = value_range(f);
            for n in 0..8usize {
                let s: Vec<i32> = (0..n)
                    .map(|k| {
                        let span = (hi - lo) as i128;
                        (lo as i128 + (k as i128 * 7919 * 104729) % (span + 1)) as i32
                    })
                    .collect();
                let bytes = encode(f, &s);
                assert_eq!(
                    bytes.len() as u64,
                    bytes_for(f, n as u64),
                    "format {f} n {n}"
                );
                assert!(
                    samples_in(f, bytes.len() as u64) >= n as u64,
                    "format {f} n {n}"
                );
                let mut out = Vec::new();
                decode(f, &bytes, n, &mut out);
                assert_eq!(out, s, "format {f} n {n}");
            }
        }
    }
}
