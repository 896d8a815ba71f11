//! The curves of a run as a PNG: loss (train and validation) above, accuracy below (stage 2 and
//! bt). Axis labels are drawn when a system TrueType font is found (DejaVu or Liberation);
//! without one the curves are still drawn.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::settings::Stage;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn register_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for f in FONTS {
            if let Ok(bytes) = std::fs::read(f) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

type Series = Vec<(f64, f64)>;

fn series(metrics: &str, split: &str, key: &str) -> Series {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("split").and_then(|s| s.as_str()) == Some(split))
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect()
}

fn range(all: &[&Series], pad_zero: bool) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let pts = all.iter().flat_map(|s| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..1.0);
    }
    if pad_zero {
        y0 = y0.min(0.0);
    }
    let dy = (y1 - y0).max(1e-6) * 0.05;
    (x0.min(x1 - 1.0)..x1, (y0 - dy)..(y1 + dy))
}

/// Draws `metrics` (the run's metrics.jsonl) into `png`.
pub fn plot_metrics(metrics: &Path, png: &Path, stage: Stage) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    // Drawn beside the target and renamed over it (the encoder picks PNG from the extension).
    let name = png
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("curves.png");
    let tmp = png.with_file_name(format!(".tmp-{}-{name}", std::process::id()));
    draw(&text, &tmp, stage).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, png).map_err(|e| Error::io(png, e))
}

fn draw(text: &str, png: &Path, stage: Stage) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Input(format!("{}: {e}", png.display()));
    let labels = register_font();
    let panels: u32 = if stage == Stage::Pretrain { 1 } else { 2 };
    let root = BitMapBackend::new(png, (900, 320 * panels)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels as usize, 1));
    let plots = [("loss", "loss"), ("acc", "accuracy")];
    for (area, (key, name)) in areas.iter().zip(plots) {
        let train = series(text, "train", key);
        let valid = series(text, "valid", key);
        let (xr, yr) = range(&[&train, &valid], key == "acc");
        let mut b = ChartBuilder::on(area);
        b.margin(12);
        if labels {
            b.caption(
                format!("{} {name}: train (blue), validation (red)", stage.name()),
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(50);
        }
        let mut chart = b.build_cartesian_2d(xr, yr).map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        if labels {
            mesh.x_desc("step");
        } else {
            mesh.disable_axes().x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(valid.into_iter().map(|p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
