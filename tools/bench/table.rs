//! The benchmark table: one row per workload, ours against the peer.

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Workload name.
    pub name: String,
    /// Our figure.
    pub ours: f64,
    /// The peer's figure, when the row has a peer.
    pub peer: Option<f64>,
    /// Unit of both figures.
    pub unit: &'static str,
    /// Whether more is better (throughput) or less (a time).
    pub higher_is_better: bool,
}

impl Row {
    /// Above 1.0 means we are better.
    pub fn ratio(&self) -> Option<f64> {
        let p = self.peer?;
        if self.higher_is_better {
            (p > 0.0).then(|| self.ours / p)
        } else {
            (self.ours > 0.0).then(|| p / self.ours)
        }
    }
}

/// Prints the rows as a Markdown table, then `worst ratio: <x>`.
pub fn print(title: &str, peer: &str, rows: &[Row]) {
    println!("### {title}\n");
    println!("| workload | ours | {peer} | unit | ratio |");
    println!("|---|---:|---:|---|---:|");
    for r in rows {
        let peer = r
            .peer
            .map(|p| format!("{p:.1}"))
            .unwrap_or_else(|| "-".into());
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {:.1} | {peer} | {} | {ratio} |",
            r.name, r.ours, r.unit
        );
    }
    let worst = rows
        .iter()
        .filter_map(Row::ratio)
        .fold(f64::INFINITY, f64::min);
    println!();
    if worst.is_finite() {
        println!("worst ratio: {worst:.2}");
    } else {
        println!("worst ratio: -");
    }
}
