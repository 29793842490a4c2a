//! `check`: a consistency check of a VHD (what `qemu-img check` cannot do
//! for this format). It never stops at the first problem: it lists every
//! finding with where it is and what to do about it.

use crate::disk::{OpenOptions, Vhd, UNALLOCATED};
use crate::footer::{Footer, Geometry, FOOTER_SIZE};
use crate::header::HEADER_SIZE;
use crate::io::BlockIo;
use crate::SECTOR;
use std::path::Path;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Unusual but harmless (for example space no block uses).
    Warning,
    /// The image is damaged or cannot be used as it is.
    Error,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious.
    pub severity: Severity,
    /// The structure concerned ("footer", "BAT entry 3", "parent", ...).
    pub structure: String,
    /// Byte offset in the file, where it applies.
    pub offset: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        match self.offset {
            Some(o) => write!(
                f,
                "{sev}: {} at offset {o}: {}",
                self.structure, self.problem
            ),
            None => write!(f, "{sev}: {}: {}", self.structure, self.problem),
        }
    }
}

fn finding(severity: Severity, structure: &str, offset: Option<u64>, problem: String) -> Finding {
    Finding {
        severity,
        structure: structure.into(),
        offset,
        problem,
    }
}

/// Checks the image at `path` (and its parent chain). An empty list means
/// the image is clean.
pub fn check(path: &Path, opts: &OpenOptions) -> Vec<Finding> {
    let opts = OpenOptions {
        write: false,
        write_parent: false,
        ..opts.clone()
    };
    if crate::ops::is_vhdx_file(path) {
        return match crate::vhdx::Vhdx::open(path, false).and_then(|v| v.check()) {
            Ok(f) => f,
            Err(e) => vec![finding(Severity::Error, "image", None, format!("{e}"))],
        };
    }
    let vhd = match Vhd::open(path, &opts) {
        Ok(v) => v,
        Err(e) => {
            let structure = match &e {
                crate::Error::ParentNotFound { .. }
                | crate::Error::ParentMismatch { .. }
                | crate::Error::ParentLoop { .. } => "parent",
                _ => "image",
            };
            return vec![finding(Severity::Error, structure, None, format!("{e}"))];
        }
    };
    check_open(&vhd)
}

/// Checks an open image (the checks that go beyond what opening it
/// verified already).
pub fn check_open<I: BlockIo>(vhd: &Vhd<I>) -> Vec<Finding> {
    let mut out = Vec::new();
    let f = vhd.footer();
    let len = match vhd.io().len() {
        Ok(l) => l,
        Err(e) => {
            return vec![finding(
                Severity::Error,
                "image",
                None,
                format!("cannot get its length: {e}"),
            )]
        }
    };
    if vhd.footer_recovered() {
        out.push(finding(
            Severity::Error,
            "footer",
            Some(len.saturating_sub(FOOTER_SIZE as u64)),
            "missing at the end of the file (an interrupted write); the copy at offset 0 is intact: opening the image read-write repairs it".into(),
        ));
    }
    if f.features & crate::footer::FEATURES_RESERVED == 0 {
        out.push(finding(
            Severity::Warning,
            "footer",
            None,
            "features field lacks the reserved bit 0x2".into(),
        ));
    }
    if f.current_size % SECTOR != 0 {
        out.push(finding(
            Severity::Error,
            "footer",
            None,
            format!(
                "current size {} is not a whole number of sectors",
                f.current_size
            ),
        ));
    }
    let g = Geometry::for_size(f.current_size);
    if f.geometry != g
        && f.geometry.size() < f.current_size.min(Geometry::MAX.size())
        && &f.creator_app != b"vpc "
        && &f.creator_app != b"qemu"
    {
        out.push(finding(
            Severity::Warning,
            "footer",
            None,
            format!(
                "geometry {}/{}/{} addresses less than the size ({} bytes)",
                f.geometry.cylinders,
                f.geometry.heads,
                f.geometry.sectors_per_track,
                f.current_size
            ),
        ));
    }
    if let Some(h) = vhd.header() {
        check_sparse(vhd, h, len, &mut out);
    } else if len != f.current_size + FOOTER_SIZE as u64 && len != f.current_size + 511 {
        out.push(finding(
            Severity::Error,
            "image",
            None,
            format!(
                "fixed disk of {} bytes in a file of {len} bytes (expected {})",
                f.current_size,
                f.current_size + 512
            ),
        ));
    }
    if let Some(p) = vhd.parent() {
        for mut x in check_open(p) {
            x.structure = format!("parent {}: {}", p.name(), x.structure);
            out.push(x);
        }
    }
    out
}

fn check_sparse<I: BlockIo>(vhd: &Vhd<I>, h: &crate::DynHeader, len: u64, out: &mut Vec<Finding>) {
    let f = vhd.footer();
    // The copy at offset 0 must equal the footer at the end.
    let mut c = [0u8; FOOTER_SIZE];
    match vhd.io().read_at(&mut c, 0) {
        Ok(()) => match Footer::parse(&c) {
            Ok(copy) if copy == *f => {}
            Ok(_) => out.push(finding(
                Severity::Warning,
                "footer copy",
                Some(0),
                "differs from the footer at the end".into(),
            )),
            Err(e) => out.push(finding(
                Severity::Error,
                "footer copy",
                Some(0),
                e.to_string(),
            )),
        },
        Err(e) => out.push(finding(
            Severity::Error,
            "footer copy",
            Some(0),
            format!("unreadable: {e}"),
        )),
    }
    let bat = match vhd.bat() {
        Ok(b) => b,
        Err(e) => {
            out.push(finding(
                Severity::Error,
                "BAT",
                Some(h.table_offset),
                e.to_string(),
            ));
            return;
        }
    };
    let bs = u64::from(h.block_size);
    let footprint = h.bitmap_size() + bs;
    let end = vhd.data_end().unwrap_or(len);
    // Structures that blocks must not overlap.
    let mut regions: Vec<(u64, u64, String)> = vec![
        (0, SECTOR, "footer copy".into()),
        (
            f.data_offset,
            f.data_offset + HEADER_SIZE as u64,
            "dynamic header".into(),
        ),
        (h.table_offset, h.table_offset + h.bat_size(), "BAT".into()),
    ];
    for (i, l) in h.locators.iter().enumerate().filter(|(_, l)| l.code != 0) {
        if l.data_offset.saturating_add(u64::from(l.data_len)) > len {
            out.push(finding(
                Severity::Error,
                &format!("parent locator {i}"),
                Some(l.data_offset),
                format!("{} bytes of data run past the end of the file", l.data_len),
            ));
        }
        regions.push((
            l.data_offset,
            l.data_offset.saturating_add(l.space_bytes()),
            format!("parent locator {i}"),
        ));
    }
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let off = u64::from(e) * SECTOR;
        for (a, b, what) in &regions {
            if off < *b && off + footprint > *a {
                out.push(finding(
                    Severity::Error,
                    &format!("BAT entry {i}"),
                    Some(h.table_offset + 4 * i as u64),
                    format!("block at {off} overlaps the {what}"),
                ));
            }
        }
        if off + footprint > end {
            out.push(finding(
                Severity::Error,
                &format!("BAT entry {i}"),
                Some(h.table_offset + 4 * i as u64),
                format!("block at {off} runs past the footer at {end}"),
            ));
        }
        // A differencing disk's bitmap may not mark sectors beyond the disk.
        if vhd.parent().is_some() {
            if let Ok(Some(b)) = vhd.block_bitmap(i as u32) {
                let first = i as u64 * bs;
                let last_sector = (vhd.size().saturating_sub(first)).min(bs) / SECTOR;
                if (last_sector..bs / SECTOR).any(|s| crate::disk::bit(&b, s)) {
                    out.push(finding(
                        Severity::Warning,
                        &format!("block {i} bitmap"),
                        Some(off),
                        "marks sectors beyond the end of the disk".into(),
                    ));
                }
            }
        }
    }
    // Unused space between the last block and the footer.
    if len > end + FOOTER_SIZE as u64 && !vhd.footer_recovered() {
        out.push(finding(
            Severity::Warning,
            "image",
            Some(end + FOOTER_SIZE as u64),
            format!("{} bytes after the footer", len - end - FOOTER_SIZE as u64),
        ));
    }
}
