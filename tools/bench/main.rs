//! `csv-bench`: the benchmark driver behind `tools/bench/run <suite>`.
//!
//! Each suite runs our code and its peer on the same work in the same run,
//! alternating them, and prints a Markdown table with a `ratio` column
//! oriented so that above 1.0 means we are better; the last line is
//! `worst ratio: <x>`. Not a test: figures are recorded in
//! docs/PERFORMANCE.md, never asserted.

use anyhow::{bail, Result};

mod fs_suite;
mod iscsi_suite;
mod meta_suite;
mod redirect_suite;
mod snap_suite;
mod table;
mod vhd_suite;
mod vmm_suite;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(suite) = args.first() else {
        bail!(
            "usage: csv-bench <suite> [options]; suites: vhd, iscsi, meta, fs, redirect, vmm, snap"
        );
    };
    match suite.as_str() {
        "vhd" => vhd_suite::run(&args[1..]),
        "iscsi" => iscsi_suite::run(&args[1..]),
        "meta" => meta_suite::run(&args[1..]),
        "fs" => fs_suite::run(&args[1..]),
        "redirect" => redirect_suite::run(&args[1..]),
        "vmm" => vmm_suite::run(&args[1..]),
        "snap" => snap_suite::run(&args[1..]),
        other => {
            bail!("unknown suite `{other}`; suites: vhd, iscsi, meta, fs, redirect, vmm, snap")
        }
    }
}
