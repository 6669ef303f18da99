//! Rendering: layout geometry, determinism, distortions, real and synthetic records.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use ecg_io::{ReadOptions, read_record};
use ecg_render::{Distortions, RenderConfig, Renderer};

fn ink(img: &image::RgbImage) -> usize {
    img.pixels()
        .filter(|p| p.0[0] < 80 && p.0[1] < 80 && p.0[2] < 80)
        .count()
}

#[test]
fn synthetic_record_renders_with_grid_and_traces() {
    let e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 1, 0);
    let r = Renderer::new(RenderConfig {
        dpi: 100.0,
        ..RenderConfig::default()
    })
    .unwrap();
    let img = r.render(&e.record).unwrap();
    assert_eq!(img.dimensions(), (1100, 850));
    // Traces are drawn: plenty of black pixels, but far from all.
    let n = ink(&img);
    assert!(n > 10_000 && n < 200_000, "{n} ink pixels");
    // Grid: red-dominant pixels exist where no trace is.
    let red = img
        .pixels()
        .filter(|p| p.0[0] > 200 && p.0[1] < 170)
        .count();
    assert!(red > 10_000, "{red}");
    // Deterministic.
    assert_eq!(r.render(&e.record).unwrap(), img);
}

#[test]
fn distortions_change_pixels_deterministically_and_grayscale_is_gray() {
    let e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 1, 1);
    let base = RenderConfig {
        dpi: 60.0,
        ..RenderConfig::default()
    };
    let plain = Renderer::new(base.clone())
        .unwrap()
        .render(&e.record)
        .unwrap();
    let d = RenderConfig {
        distortions: Distortions {
            rotation_deg: 3.0,
            noise_sd: 8.0,
            color_jitter: 0.1,
            creases: 2,
            blur_px: 1,
            seed: 9,
        },
        ..base.clone()
    };
    let r = Renderer::new(d).unwrap();
    let a = r.render(&e.record).unwrap();
    assert_ne!(a, plain);
    assert_eq!(a, r.render(&e.record).unwrap());
    let g = Renderer::new(RenderConfig {
        grayscale: true,
        ..base
    })
    .unwrap()
    .render(&e.record)
    .unwrap();
    assert!(g.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
}

#[test]
fn bad_config_and_empty_record_are_errors() {
    assert!(
        Renderer::new(RenderConfig {
            dpi: 5.0,
            ..RenderConfig::default()
        })
        .is_err()
    );
    let mut e = ecg_synth::generate(&ecg_synth::SynthConfig::default(), 1, 2).record;
    for c in &mut e.channels {
        c.lead = ecg_io::Lead::Other("x".into());
    }
    let r = Renderer::new(RenderConfig {
        dpi: 50.0,
        ..RenderConfig::default()
    })
    .unwrap();
    assert!(matches!(
        r.render(&e),
        Err(ecg_render::Error::Record { .. })
    ));
}

/// Real PTB-XL and CinC records render; the image written for the docs comparison.
#[test]
fn real_records_render() {
    let Some(shared) = evl_testkit::shared_dir() else {
        return;
    };
    let r = Renderer::new(RenderConfig {
        dpi: 100.0,
        ..RenderConfig::default()
    })
    .unwrap();
    for rel in [
        "data/ptbxl_subset/records500/00000/00001_hr",
        "data/cinc2021_subset/cpsc2018/A0001",
        "data/code15_wfdb/1111",
    ] {
        let rec = read_record(&shared.join(rel), ReadOptions::default()).unwrap();
        let img = r.render(&rec).unwrap();
        assert!(ink(&img) > 5_000, "{rel}");
    }
}
