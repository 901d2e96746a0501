//! Summaries of repeated measurements, for the benchmarks' tables.

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `min/median/max` with `digits` decimals.
pub fn min_med_max(v: &[f64], digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.digits$}/{:.digits$}/{hi:.digits$}", median(v.to_vec()))
}
