//! SVG plots next to the benchmarks' JSON (issue 14): a curve where one says more than a
//! number. Drawn with plotters' SVG backend only.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One named curve: (x, y) points in order of x.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as lines with points into the SVG file `path`, x on a log scale when
/// `log_x` (kernel counts, tree sizes).
pub fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, log_x: bool, series: &[Series]) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in points() {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        anyhow::bail!("no points to plot for {}", path.display());
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder.caption(title, ("sans-serif", 20)).margin(16).x_label_area_size(44).y_label_area_size(80);
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
                for (i, s) in series.iter().enumerate() {
                    let color = colors[i % colors.len()];
                    chart
                        .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                    chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            }};
        }
        if log_x {
            finish!(builder.build_cartesian_2d((x_min..x_max).log_scale(), 0f64..y_max)?);
        } else {
            finish!(builder.build_cartesian_2d(x_min..x_max, 0f64..y_max)?);
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("drawing {}", path.display()))
}
