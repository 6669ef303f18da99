//! Writes the fuzz corpus seeds under `fuzz/corpus/<target>/`: small inputs of every kind,
//! all made here from SYNTHETIC records (ecg-synth) or by hand, so the repository ships no
//! copy of anyone's data. Run once; libFuzzer grows the corpus from these.
//!
//! `cargo run -p evl-fuzz --example make_seeds`
#![allow(clippy::unwrap_used)] // a one-off generator: a panic is the report

use std::path::{Path, PathBuf};

fn put(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A short SYNTHETIC 12-lead record (1 s at 100 Hz).
fn record(seed: u64) -> ecg_io::Record {
    let cfg = ecg_synth::SynthConfig {
        fs: 100,
        duration_s: 1.0,
        ..Default::default()
    };
    let mut r = ecg_synth::generate(&cfg, seed, 0).record;
    r.name = "f".into();
    r
}

/// The WFDB files of a record in `format`: (header, signal file name, signal bytes).
fn wfdb(r: &ecg_io::Record, format: u32) -> (Vec<u8>, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    if ecg_io::write_record(dir.path(), r, format).is_err() {
        // Narrow formats (8 and 10 bits): the same record at a coarser resolution.
        let mut coarse = r.clone();
        for c in &mut coarse.channels {
            c.adc.iter_mut().for_each(|v| *v /= 16);
            c.gain /= 16.0;
        }
        ecg_io::write_record(dir.path(), &coarse, format).unwrap();
    }
    let head = std::fs::read(dir.path().join("f.hea")).unwrap();
    let h = ecg_io::wfdb::Header::parse_bytes(&head, Path::new("f.hea")).unwrap();
    let name = h.signals[0].file.clone();
    let sig = std::fs::read(dir.path().join(&name)).unwrap();
    (head, name, sig)
}

/// A MATLAB v4 matrix of int16, rows = leads (as the CinC records store them).
fn mat(r: &ecg_io::Record, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let rows = r.channels.len() as i32;
    // MOPT type 30: little-endian, int16, full matrix.
    for v in [30i32, rows, n as i32, 0, 4] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(b"val\0");
    for k in 0..n {
        for c in &r.channels {
            out.extend_from_slice(&(c.adc[k % c.adc.len()] as i16).to_le_bytes());
        }
    }
    out
}

fn edf(r: &ecg_io::Record, annotations: bool) -> Vec<u8> {
    let pad = |s: &str, w: usize| format!("{s:<w$}");
    let chans = &r.channels[..3];
    let ns = chans.len() + usize::from(annotations);
    let spr = r.n_samples;
    let mut h = String::new();
    h += &pad("0", 8);
    h += &pad("X X X X", 80);
    h += &pad("Startdate 01-JAN-2020 X X X", 80);
    h += "01.01.2003.00.00";
    h += &pad(&(256 * (ns + 1)).to_string(), 8);
    h += &pad(if annotations { "EDF+C" } else { "" }, 44);
    h += &pad("1", 8);
    h += &pad("1", 8);
    h += &pad(&ns.to_string(), 4);
    let mut field = |f: &dyn Fn(usize) -> String, w: usize| {
        for k in 0..ns {
            h += &pad(&f(k), w);
        }
    };
    let is_ann = |k: usize| k == chans.len();
    field(
        &|k| {
            if is_ann(k) {
                "EDF Annotations".into()
            } else {
                chans[k].description.clone()
            }
        },
        16,
    );
    field(&|_| String::new(), 80);
    field(
        &|k| {
            if is_ann(k) {
                String::new()
            } else {
                "mV".into()
            }
        },
        8,
    );
    field(
        &|k| {
            if is_ann(k) {
                "-1".into()
            } else {
                "-32.768".into()
            }
        },
        8,
    );
    field(
        &|k| {
            if is_ann(k) {
                "1".into()
            } else {
                "32.767".into()
            }
        },
        8,
    );
    field(&|_| "-32768".into(), 8);
    field(&|_| "32767".into(), 8);
    field(&|_| String::new(), 80);
    field(
        &|k| {
            if is_ann(k) {
                "30".into()
            } else {
                spr.to_string()
            }
        },
        8,
    );
    field(&|_| String::new(), 32);
    let mut out = h.into_bytes();
    for c in chans {
        for k in 0..spr {
            let mv = c.physical_at(k);
            out.extend_from_slice(&((mv * 1000.0).round() as i16).to_le_bytes());
        }
    }
    if annotations {
        let mut a = b"+0\x14\x14\0+0.5\x14beat\x14\0".to_vec();
        a.resize(60, 0);
        out.extend_from_slice(&a);
    }
    out
}

/// MIT annotation bytes: (sample step, code) pairs, then the end marker.
fn atr(beats: &[(u16, u16)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(step, code) in beats {
        let w = (code << 10) | (step & 0x3FF);
        out.extend_from_slice(&w.to_le_bytes());
    }
    // A SKIP (code 59) with a 32-bit step, an AUX string (code 63), then the end.
    out.extend_from_slice(&(59u16 << 10).to_le_bytes());
    out.extend_from_slice(&[0x00, 0x00, 0x10, 0x00]);
    out.extend_from_slice(&((63u16 << 10) | 4).to_le_bytes());
    out.extend_from_slice(b"(AFL");
    out.extend_from_slice(&[0, 0]);
    out
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let b = evl_fuzz::BOUNDARY;
    let mut out = Vec::new();
    for (name, file, data) in parts {
        out.extend_from_slice(format!("--{b}\r\n").as_bytes());
        let disp = match file {
            Some(f) => {
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\r\n")
            }
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        out.extend_from_slice(disp.as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    out
}

fn main() {
    let root: PathBuf = evl_testkit::workspace_root().join("fuzz/corpus");
    let r = record(11);
    let mut csv = Vec::new();
    ecg_io::csv::write_csv(&r, false, &mut csv).unwrap();
    for (i, format) in [16u32, 212, 80, 24, 32, 61, 160, 310, 311]
        .into_iter()
        .enumerate()
    {
        let (head, _, sig) = wfdb(&r, format);
        put(&root, "wfdb_header", &format!("fmt{format}.hea"), &head);
        let mut both = head.clone();
        both.push(0);
        both.extend_from_slice(&sig);
        put(&root, "wfdb_record", &format!("{i:02}-fmt{format}"), &both);
    }
    // Header features: skew, byte offset, samples per frame, multi-segment, comments.
    let extra: [(&str, &[u8]); 4] = [
        ("skew_offset.hea", b"f 2 100 10\nf.dat 16:2+4 200/mV 16 0 0 0 0 I\nf.dat 16+4 200/mV 16 0 0 0 0 II\n"),
        ("frames.hea", b"f 2 100/1000(0) 10 10:00:00 01/01/2000\nf.dat 16x2 200(5)/mV 16 0 0 0 0 I\nf.dat 16 200/mV 16 0 -3 0 0 II\n# Age: 60\n"),
        ("multi.hea", b"f/2 1 100 20\nf_1 10\n~ 10\n"),
        ("format8.hea", b"f 1 100 10\nf.dat 8 200/mV 12 0 5 0 0 V1\n"),
    ];
    for (name, head) in extra {
        put(&root, "wfdb_header", name, head);
        let mut both = head.to_vec();
        both.push(0);
        both.extend_from_slice(&[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 250, 251, 252, 253, 254, 255, 0, 1, 2, 3, 4, 5, 6, 7, 8,
            9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
        ]);
        put(&root, "wfdb_record", &format!("x-{name}"), &both);
    }
    put(&root, "cinc_mat", "a12x500.mat", &mat(&r, 500));
    put(&root, "cinc_mat", "short.mat", &mat(&r, 10));
    put(&root, "edf", "edf.edf", &edf(&r, false));
    put(&root, "edf", "edfplus.edf", &edf(&r, true));
    put(
        &root,
        "annotations",
        "beats.atr",
        &atr(&[(10, 1), (80, 1), (75, 5), (90, 1), (3, 22)]),
    );
    put(&root, "csv", "record.csv", &csv);
    put(&root, "csv", "nan.csv", b"I,II,V1\n0.1,nan,-0.2\n,1e-3,4\n");
    // A rendered page at low resolution (PNG) and the same as JPEG.
    let renderer = ecg_render::Renderer::new(ecg_render::RenderConfig {
        dpi: 20.0,
        ..Default::default()
    })
    .unwrap();
    // A corner of the page (grid, a calibration pulse, a trace): a small seed keeps the
    // decoder's executions per second high.
    let page = renderer.render(&record(12)).unwrap();
    let img = image::imageops::crop_imm(&page, 0, 20, 96, 64).to_image();
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    put(&root, "image", "page.png", png.get_ref());
    let mut jpg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpg, image::ImageFormat::Jpeg).unwrap();
    put(&root, "image", "page.jpg", jpg.get_ref());
    let (head, name, sig) = wfdb(&r, 16);
    put(
        &root,
        "request",
        "wfdb",
        &multipart(&[
            ("file", Some("f.hea"), &head),
            ("file", Some(&name), &sig),
            ("render", None, b"false"),
        ]),
    );
    put(
        &root,
        "request",
        "csv",
        &multipart(&[
            ("file", Some("r.csv"), &csv),
            ("fs", None, b"100"),
            ("question", None, b"Is the rhythm regular?"),
        ]),
    );
    put(
        &root,
        "request",
        "edf",
        &multipart(&[("file", Some("r.edf"), &edf(&r, true))]),
    );
    let mut a_hea = String::from("A 12 500 10\n");
    for c in &r.channels {
        a_hea.push_str(&format!(
            "A.mat 16+24 1000/mV 16 0 0 0 0 {}\n",
            c.description
        ));
    }
    put(
        &root,
        "request",
        "cinc",
        &multipart(&[
            ("file", Some("A.hea"), a_hea.as_bytes()),
            ("file", Some("A.mat"), &mat(&r, 10)),
        ]),
    );
    put(
        &root,
        "request",
        "image",
        &multipart(&[("file", Some("p.png"), png.get_ref())]),
    );
    println!("wrote seeds under {}", root.display());
}
