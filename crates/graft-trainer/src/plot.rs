//! The training loss and evaluation curves of a run as a small self-contained SVG.
use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;

fn polyline(
    points: &[(f64, f64)],
    x_max: f64,
    y_min: f64,
    y_max: f64,
    top: f64,
    colour: &str,
) -> String {
    let span = (y_max - y_min).max(1e-12);
    let coords: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            let px = PAD + x / x_max.max(1.0) * (W - 2.0 * PAD);
            let py = top + H - PAD - (y - y_min) / span * (H - 2.0 * PAD);
            format!("{px:.1},{py:.1}")
        })
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
        coords.join(" ")
    )
}

fn panel(out: &mut String, title: &str, points: &[(f64, f64)], x_max: f64, top: f64, colour: &str) {
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, y)| {
            (lo.min(*y), hi.max(*y))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let _ = write!(
        out,
        "<rect x=\"{PAD}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"{PAD}\" y=\"{ty}\" font-size=\"13\">{title} (min {lo:.4}, max {hi:.4})</text>\
         <text x=\"{xr}\" y=\"{xb}\" font-size=\"11\" text-anchor=\"end\">step {x_max}</text>",
        y0 = top + PAD,
        w = W - 2.0 * PAD,
        h = H - 2.0 * PAD,
        ty = top + PAD - 8.0,
        xr = W - PAD,
        xb = top + H - PAD + 14.0,
    );
    if !points.is_empty() {
        out.push_str(&polyline(points, x_max, lo, hi, top, colour));
    }
}

/// `loss` and `f1` as (step, value) series.
pub fn curves_svg(loss: &[(f64, f64)], eval_name: &str, eval: &[(f64, f64)]) -> String {
    let x_max = loss.iter().chain(eval).map(|p| p.0).fold(1.0, f64::max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\">",
        2.0 * H
    );
    panel(&mut out, "training loss", loss, x_max, 0.0, "#c0392b");
    panel(&mut out, eval_name, eval, x_max, H, "#2471a3");
    out.push_str("</svg>\n");
    out
}
