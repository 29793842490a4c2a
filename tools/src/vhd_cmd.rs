//! `csvctl vhd`: create, info, check, convert, resize, merge, compact.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vhd::size::{human, parse_positive as parse_size};
use vhd::{format_uuid, CreateOptions, DiskType, OpenOptions, Severity, Vhd};

#[derive(Debug, Subcommand)]
pub enum VhdCommand {
    /// Create a VHD: fixed (all space up front), dynamic (grows as written)
    /// or, with --parent, a differencing disk holding only the changes
    /// against its parent. A PATH ending in .vhdx makes a VHDX (fixed or
    /// dynamic).
    ///
    /// Examples:
    ///   csvctl vhd create vm1.vhd --size 20G
    ///   csvctl vhd create vm1.vhd --size 20G --type fixed
    ///   csvctl vhd create vm1-diff.vhd --parent base.vhd
    ///   csvctl vhd create vm1.vhdx --size 20G
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// Show what a VHD is: type, sizes, creator, ids, parent chain.
    Info {
        /// The image.
        path: PathBuf,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Check a VHD's consistency (footer, header, BAT, blocks, parents).
    ///
    /// Exits 0 when no error was found (warnings are listed), 1 when the
    /// image has errors (each is listed with where it is).
    Check {
        /// The image.
        path: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Convert between VHD (fixed, dynamic), VHDX (fixed, dynamic) and
    /// raw. SRC may be a VHD of any kind (a differencing disk is flattened
    /// with its parents), a VHDX (a log left by a crash is replayed in
    /// memory; SRC is not changed), a raw image or a block device (a
    /// physical disk: read with O_DIRECT; for a disk in use, see `csvctl
    /// p2v`). Blocks of zeros stay unallocated in a dynamic DST. DST must
    /// not exist. A range of a device or raw image that cannot be read is
    /// written as zeros and reported with its offset; the exit status is
    /// then 1.
    ///
    /// Examples:
    ///   csvctl vhd convert vm1.vhdx vm1.vhd --to dynamic
    ///   csvctl vhd convert vm1.vhd vm1.vhdx --to vhdx
    ///   csvctl vhd convert disk.img disk.vhdx --to vhdx-fixed
    #[command(verbatim_doc_comment)]
    Convert {
        /// The source image (VHD or raw).
        src: PathBuf,
        /// The new image.
        dst: PathBuf,
        /// Format of DST.
        #[arg(long = "to", value_enum)]
        to: Format,
        /// Block size of a dynamic DST [default: 2M for VHD, 32M for VHDX].
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Grow a VHD's virtual size (shrinking is refused: it would lose data).
    Resize {
        /// The image.
        path: PathBuf,
        /// The new size (for example 40G).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Merge a differencing disk into its parent, then delete it (unless
    /// --keep). Other children of the same parent become invalid.
    Merge {
        /// The differencing disk.
        child: PathBuf,
        /// Keep the child file after merging.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Give back the space of all-zero blocks of a dynamic disk (or of
    /// empty blocks of a differencing disk) and shorten the file.
    Compact {
        /// The image.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Where to create the image (it must not exist).
    path: PathBuf,
    /// Virtual size, for example 512M, 20G, 1.5T (not with --parent: a
    /// differencing disk has its parent's size).
    #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
    size: Option<u64>,
    /// fixed or dynamic; a disk with --parent is differencing.
    #[arg(long = "type", value_enum)]
    disk_type: Option<CreateType>,
    /// Make a differencing disk of this parent.
    #[arg(long, conflicts_with = "size")]
    parent: Option<PathBuf>,
    /// Block size of a dynamic disk (a power of two; Hyper-V uses 2M for
    /// VHD, 32M for VHDX) [default: 2M for VHD, 32M for VHDX].
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Round the size up to a whole CHS geometry, as Virtual PC and
    /// `qemu-img create` without force_size do.
    #[arg(long)]
    chs_size: bool,
    /// Allocate a fixed disk's space on the file system now.
    #[arg(long)]
    preallocate: bool,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Open a differencing disk even if its parent's time stamp changed
    /// since the child was made (the parent's unique id must still match).
    #[arg(long)]
    ignore_parent_timestamp: bool,
}

impl OpenArgs {
    fn options(&self) -> OpenOptions {
        OpenOptions {
            ignore_parent_timestamp: self.ignore_parent_timestamp,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CreateType {
    Fixed,
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A fixed VHD.
    Fixed,
    /// A dynamic VHD.
    Dynamic,
    /// A raw image.
    Raw,
    /// A dynamic VHDX (Hyper-V's format since Windows Server 2012).
    Vhdx,
    /// A fixed VHDX.
    VhdxFixed,
}

pub fn run(cmd: VhdCommand) -> Result<ExitCode> {
    match cmd {
        VhdCommand::Create(a) => create(a),
        VhdCommand::Info { path, json, open } => info(&path, json, &open.options()),
        VhdCommand::Check { path, json, open } => check(&path, json, &open.options()),
        VhdCommand::Convert {
            src,
            dst,
            to,
            block_size,
            open,
        } => {
            let vhdx = matches!(to, Format::Vhdx | Format::VhdxFixed);
            let bs = block_size.unwrap_or(if vhdx { 32 << 20 } else { 2 << 20 });
            convert(&src, &dst, to, bs, &open.options())
        }
        VhdCommand::Resize { path, size } => resize(&path, size),
        VhdCommand::Merge { child, keep, open } => merge(&child, keep, &open.options()),
        VhdCommand::Compact { path } => compact(&path),
    }
}

fn block_size(b: u64) -> Result<u32> {
    match u32::try_from(b) {
        Ok(v) if v.is_power_of_two() && v >= 512 => Ok(v),
        _ => bail!("block size {b} is not a power of two between 512 bytes and 2 GiB"),
    }
}

/// Whether `p` names a VHDX by its extension.
fn vhdx_name(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx"))
}

fn create_vhdx(a: &CreateArgs) -> Result<ExitCode> {
    if a.parent.is_some() {
        bail!("differencing VHDX disks are not made here: make a differencing VHD (.vhd), or a VHDX without --parent");
    }
    if a.chs_size {
        bail!("--chs-size is for VHD: a VHDX has no CHS geometry");
    }
    let fixed = matches!(a.disk_type, Some(CreateType::Fixed));
    let mut o = vhd::vhdx::CreateOptions::new(a.size.unwrap_or(0), fixed);
    let bs = a.block_size.unwrap_or(32 << 20);
    o.block_size = match u32::try_from(bs) {
        Ok(v) if v.is_power_of_two() && (1 << 20..=256 << 20).contains(&v) => v,
        _ => bail!("block size {bs} of a VHDX: a power of two from 1M to 256M"),
    };
    let v = vhd::vhdx::Vhdx::create(&a.path, &o)
        .with_context(|| format!("cannot create {}", a.path.display()))?;
    let size = v.size();
    v.close()
        .with_context(|| format!("cannot close {}", a.path.display()))?;
    println!(
        "created {} VHDX {} of {}",
        if fixed { "fixed" } else { "dynamic" },
        a.path.display(),
        human(size)
    );
    Ok(ExitCode::SUCCESS)
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    if vhdx_name(&a.path) {
        return create_vhdx(&a);
    }
    let dt = match (a.parent.is_some(), a.disk_type) {
        (true, None) => DiskType::Differencing,
        (true, Some(t)) => bail!(
            "--type {t:?} with --parent: a disk with a parent is always differencing; drop --type"
        ),
        (false, Some(CreateType::Fixed)) => DiskType::Fixed,
        (false, _) => DiskType::Dynamic,
    };
    let mut o = CreateOptions::new(dt, a.size.unwrap_or(0));
    o.block_size = block_size(a.block_size.unwrap_or(2 << 20))?;
    o.parent = a.parent.clone();
    o.chs_size = a.chs_size;
    o.preallocate = a.preallocate;
    let v =
        Vhd::create(&a.path, &o).with_context(|| format!("cannot create {}", a.path.display()))?;
    print!(
        "created {} VHD {} of {}",
        dt.name(),
        a.path.display(),
        human(v.size())
    );
    if let Some(p) = &a.parent {
        print!(" (parent {})", p.display());
    }
    println!();
    Ok(ExitCode::SUCCESS)
}

fn open_rw(path: &Path) -> Result<Vhd<std::fs::File>> {
    open(
        path,
        &OpenOptions {
            write: true,
            ..Default::default()
        },
    )
}

fn open(path: &Path, opts: &OpenOptions) -> Result<Vhd<std::fs::File>> {
    if vhd::ops::is_vhdx_file(path) {
        bail!(
            "{} is a VHDX: this is done on VHD files; convert it first (csvctl vhd convert {} OUT.vhd --to dynamic)",
            path.display(),
            path.display()
        );
    }
    Vhd::open(path, opts).with_context(|| format!("cannot open {}", path.display()))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn iso8601(unix: u64) -> String {
    let (y, m, d, hh, mm, ss) = coordinator::group::utc(unix.saturating_mul(1000));
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

fn describe<I: vhd::BlockIo>(v: &Vhd<I>) -> Result<serde_json::Value> {
    let f = v.footer();
    let file_size = v.io().len().context("cannot get the file's length")?;
    let mut j = serde_json::json!({
        "path": v.name(),
        "type": v.disk_type().name(),
        "virtual_size": v.size(),
        "file_size": file_size,
        "creator": f.creator(),
        "creator_version": format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
        "creator_host_os": String::from_utf8_lossy(&f.creator_host_os.to_be_bytes()).trim_end_matches('\0').to_string(),
        "created": iso8601(vhd::footer::vhd_time_to_unix(f.timestamp)),
        "unique_id": format_uuid(&f.unique_id),
        "geometry": {
            "cylinders": f.geometry.cylinders,
            "heads": f.geometry.heads,
            "sectors_per_track": f.geometry.sectors_per_track,
        },
        "saved_state": f.saved_state != 0,
        "footer_recovered": v.footer_recovered(),
    });
    if let (Some(h), Some(bs)) = (v.header(), v.block_size()) {
        let allocated = v.allocated_blocks()? as u64;
        j["block_size"] = bs.into();
        j["bat_entries"] = h.max_table_entries.into();
        j["allocated_blocks"] = allocated.into();
        j["allocated_bytes"] = (allocated * bs).into();
    }
    if let (Some(h), Some(p)) = (v.header(), v.parent()) {
        j["parent"] = serde_json::json!({
            "name": h.parent_name,
            "unique_id": format_uuid(&h.parent_unique_id),
            "path": p.name(),
        });
        j["parent_info"] = describe(p)?;
    }
    Ok(j)
}

/// A VHDX's `info`.
fn describe_vhdx(path: &Path) -> Result<serde_json::Value> {
    let v = vhd::vhdx::Vhdx::open(path, false)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let h = v.header()?;
    let allocated = v.allocated_blocks()?;
    Ok(serde_json::json!({
        "path": v.name(),
        "format": "vhdx",
        "type": if v.is_fixed() { "fixed" } else { "dynamic" },
        "virtual_size": v.size(),
        "file_size": vhd::BlockIo::len(v.io()).context("cannot get the file's length")?,
        "block_size": v.block_size(),
        "allocated_blocks": allocated,
        "allocated_bytes": allocated * u64::from(v.block_size()),
        "logical_sector_size": v.logical_sector(),
        "physical_sector_size": v.physical_sector(),
        "creator": v.creator(),
        "disk_id": vhd::vhdx::format::format_guid(&v.disk_id()),
        "header_sequence": h.sequence,
        "log_replay_pending": h.log_guid != [0; 16] && v.replayed() > 0,
        "log_entries_to_replay": v.replayed(),
    }))
}

fn info(path: &Path, json: bool, opts: &OpenOptions) -> Result<ExitCode> {
    if vhd::ops::is_vhdx_file(path) {
        let j = describe_vhdx(path)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&j)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("{}", path.display());
        let row = |k: &str, v: String| println!("  {k:<16} {v}");
        row("format", "VHDX".into());
        row("type", j["type"].as_str().unwrap_or("").into());
        row(
            "virtual size",
            format!(
                "{} ({} bytes)",
                human(j["virtual_size"].as_u64().unwrap_or(0)),
                j["virtual_size"]
            ),
        );
        row("file size", human(j["file_size"].as_u64().unwrap_or(0)));
        row("block size", human(j["block_size"].as_u64().unwrap_or(0)));
        row(
            "allocated",
            format!(
                "{} blocks, {}",
                j["allocated_blocks"],
                human(j["allocated_bytes"].as_u64().unwrap_or(0))
            ),
        );
        row(
            "sectors",
            format!(
                "{} logical, {} physical",
                j["logical_sector_size"], j["physical_sector_size"]
            ),
        );
        row("creator", j["creator"].as_str().unwrap_or("").into());
        row("disk id", j["disk_id"].as_str().unwrap_or("").into());
        if j["log_entries_to_replay"].as_u64().unwrap_or(0) > 0 {
            row(
                "warning",
                format!(
                    "its log holds {} entr(ies) to replay (a crash while it was written); read here with the replay in memory; a read-write open (csvctl vhd convert, Hyper-V, qemu) writes it",
                    j["log_entries_to_replay"]
                ),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let v = open(path, opts)?;
    let j = describe(&v)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut level = Some(&j);
    let mut indent = String::new();
    while let Some(j) = level {
        println!("{indent}{}", j["path"].as_str().unwrap_or(""));
        let row = |k: &str, v: String| println!("{indent}  {k:<16} {v}");
        row("type", j["type"].as_str().unwrap_or("").into());
        row(
            "virtual size",
            format!(
                "{} ({} bytes)",
                human(j["virtual_size"].as_u64().unwrap_or(0)),
                j["virtual_size"]
            ),
        );
        row("file size", human(j["file_size"].as_u64().unwrap_or(0)));
        if let Some(bs) = j["block_size"].as_u64() {
            row("block size", human(bs));
            row(
                "allocated",
                format!(
                    "{} blocks of {}, {}",
                    j["allocated_blocks"],
                    j["bat_entries"],
                    human(j["allocated_bytes"].as_u64().unwrap_or(0))
                ),
            );
        }
        row(
            "creator",
            format!(
                "{} {} on {}",
                j["creator"].as_str().unwrap_or(""),
                j["creator_version"].as_str().unwrap_or(""),
                j["creator_host_os"].as_str().unwrap_or("")
            ),
        );
        row("created", j["created"].as_str().unwrap_or("").into());
        row("unique id", j["unique_id"].as_str().unwrap_or("").into());
        let g = &j["geometry"];
        row(
            "geometry",
            format!(
                "{}/{}/{} (C/H/S)",
                g["cylinders"], g["heads"], g["sectors_per_track"]
            ),
        );
        if j["footer_recovered"].as_bool() == Some(true) {
            row(
                "warning",
                "footer at the end was missing; the copy at offset 0 was used".into(),
            );
        }
        if j["parent"].is_object() {
            row(
                "parent",
                format!(
                    "{} ({})",
                    j["parent"]["path"].as_str().unwrap_or(""),
                    j["parent"]["unique_id"].as_str().unwrap_or("")
                ),
            );
        }
        level = j.get("parent_info");
        indent.push_str("    ");
    }
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path, json: bool, opts: &OpenOptions) -> Result<ExitCode> {
    let findings = vhd::check(path, opts);
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if json {
        let list: Vec<_> = findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "severity": if f.severity == Severity::Error { "error" } else { "warning" },
                    "structure": f.structure,
                    "offset": f.offset,
                    "problem": f.problem,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"path": path, "clean": errors == 0, "findings": list})
            )?
        );
    } else {
        for f in &findings {
            println!("{f}");
        }
        if errors == 0 {
            println!("{}: clean ({} warning(s))", path.display(), findings.len());
        } else {
            println!(
                "{}: {errors} error(s), {} warning(s)",
                path.display(),
                findings.len() - errors
            );
        }
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {percent:>3}% {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A progress callback that moves `pb`.
pub(crate) fn track(pb: &ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    }
}

pub(crate) fn ops_format(to: Format) -> vhd::ops::Format {
    match to {
        Format::Fixed => vhd::ops::Format::Fixed,
        Format::Dynamic => vhd::ops::Format::Dynamic,
        Format::Raw => vhd::ops::Format::Raw,
        Format::Vhdx => vhd::ops::Format::Vhdx,
        Format::VhdxFixed => vhd::ops::Format::VhdxFixed,
    }
}

/// Converts with a progress bar; prints what was done and every range
/// that could not be read.
pub(crate) fn convert_reporting(
    src: &Path,
    dst: &Path,
    to: Format,
    bs: u64,
    opts: &OpenOptions,
) -> Result<vhd::ops::ConvertReport> {
    let pb = bar(0, "convert");
    let r = vhd::ops::convert(
        src,
        dst,
        ops_format(to),
        block_size(bs)?,
        opts,
        &mut track(&pb),
    )
    .with_context(|| format!("cannot convert {} to {}", src.display(), dst.display()))?;
    pb.finish_and_clear();
    println!(
        "converted {} ({}, {}) to {} ({:?}): {} of data written",
        src.display(),
        if r.source_was_vhd {
            "VHD"
        } else if r.source_was_vhdx {
            "VHDX"
        } else if r.source_was_device {
            "block device, read with O_DIRECT"
        } else {
            "raw"
        },
        human(r.size),
        dst.display(),
        to,
        human(r.written)
    );
    if !r.unreadable.is_empty() {
        let total: u64 = r.unreadable.iter().map(|(_, l)| l).sum();
        for (off, len) in &r.unreadable {
            eprintln!(
                "unreadable: {len} bytes at offset {off} ({}..{}), written as zeros",
                off,
                off + len
            );
        }
        eprintln!(
            "{}: {} unreadable range(s), {total} bytes in all ({}): {} is incomplete there",
            src.display(),
            r.unreadable.len(),
            human(total),
            dst.display()
        );
    }
    Ok(r)
}

fn convert(src: &Path, dst: &Path, to: Format, bs: u64, opts: &OpenOptions) -> Result<ExitCode> {
    let r = convert_reporting(src, dst, to, bs, opts)?;
    Ok(if r.unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn resize(path: &Path, size: u64) -> Result<ExitCode> {
    let mut v = open_rw(path)?;
    let old = v.size();
    vhd::ops::resize(&mut v, size).with_context(|| format!("cannot resize {}", path.display()))?;
    println!(
        "resized {} from {} to {}",
        path.display(),
        human(old),
        human(v.size())
    );
    Ok(ExitCode::SUCCESS)
}

fn merge(child: &Path, keep: bool, opts: &OpenOptions) -> Result<ExitCode> {
    let pb = bar(0, "merge");
    let r = vhd::ops::merge(child, opts, &mut track(&pb))
        .with_context(|| format!("cannot merge {}", child.display()))?;
    pb.finish_and_clear();
    println!(
        "merged {} of {} into {}",
        human(r.bytes),
        child.display(),
        r.parent.display()
    );
    if !keep {
        std::fs::remove_file(child)
            .with_context(|| format!("merged, but cannot delete {}", child.display()))?;
        println!("deleted {}", child.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(path: &Path) -> Result<ExitCode> {
    let mut v = open_rw(path)?;
    let pb = bar(0, "compact");
    let r = vhd::ops::compact(&mut v, &mut track(&pb))
        .with_context(|| format!("cannot compact {}", path.display()))?;
    pb.finish_and_clear();
    println!(
        "compacted {}: {} block(s) dropped, {} moved, {} given back",
        path.display(),
        r.dropped,
        r.moved,
        human(r.freed)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::iso8601;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(946_684_800), "2000-01-01T00:00:00Z");
        assert_eq!(iso8601(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
