//! The consistency check of an open VHDX (`csvctl vhd check`): what the
//! open noted (a damaged copy of a header or region table, a replayed
//! log) and every BAT entry's state and place.

use super::format::*;
use super::{lock_err, Vhdx};
use crate::check::{Finding, Severity};
use crate::error::{IoContext, Result};
use crate::io::BlockIo;

impl<I: BlockIo> Vhdx<I> {
    /// A consistency check: every finding, errors and warnings.
    pub fn check(&self) -> Result<Vec<Finding>> {
        let mut out = self.notes.clone();
        if self.replayed > 0 {
            out.push(Finding {
                severity: Severity::Warning,
                structure: "log".into(),
                offset: None,
                problem: format!(
                    "{} entr{} replayed at open{}",
                    self.replayed,
                    if self.replayed == 1 { "y" } else { "ies" },
                    if self.writable {
                        ""
                    } else {
                        " (in memory: the file still needs the replay; open it for writing)"
                    }
                ),
            });
        }
        let len = self.io.len().ctx(&self.name, || "stat".into(), 0)?;
        let bat = self.bat.read().map_err(|_| lock_err(&self.name))?;
        let bs = u64::from(self.block_size);
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (i, e) in bat.iter().enumerate() {
            let i = i as u64;
            let pos = self.bat_offset + i * 8;
            let bitmap = (i + 1) % (self.chunk_ratio + 1) == 0;
            if bitmap {
                if entry_state(*e) != SB_NOT_PRESENT {
                    out.push(Finding {
                        severity: Severity::Warning,
                        structure: format!("BAT entry {i}"),
                        offset: Some(pos),
                        problem: format!(
                            "a sector bitmap entry in state {} in a disk without a parent",
                            entry_state(*e)
                        ),
                    });
                }
                continue;
            }
            match payload_state(*e) {
                None => out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(pos),
                    problem: format!("unknown state {}", entry_state(*e)),
                }),
                Some(BlockState::PartiallyPresent) => out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(pos),
                    problem: "partially present in a disk without a parent".into(),
                }),
                Some(BlockState::FullyPresent) => {
                    let at = entry_offset(*e);
                    let block = i - i / (self.chunk_ratio + 1);
                    let need = bs.min(self.size.saturating_sub(block * bs));
                    if at < HEADER_SECTION || at.saturating_add(need) > len {
                        out.push(Finding {
                            severity: Severity::Error,
                            structure: format!("BAT entry {i}"),
                            offset: Some(pos),
                            problem: format!(
                                "block at {at}..{} is outside the file's data ({len} bytes)",
                                at + bs
                            ),
                        });
                    }
                    used.push((at, i));
                }
                Some(_) => {}
            }
        }
        // No two blocks share space, and none overlaps the metadata.
        used.sort();
        for w in used.windows(2) {
            if w[0].0 + bs > w[1].0 {
                out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {}", w[1].1),
                    offset: Some(self.bat_offset + w[1].1 * 8),
                    problem: format!("its block overlaps entry {}'s", w[0].1),
                });
            }
        }
        let fixed_regions = [
            (
                self.bat_offset,
                (bat.len() as u64 * 8).next_multiple_of(MIB),
            ),
            (self.meta_offset, MIB),
        ];
        for (at, i) in &used {
            if fixed_regions
                .iter()
                .any(|(s, l)| *at < s + l && s < &(at + bs))
            {
                out.push(Finding {
                    severity: Severity::Error,
                    structure: format!("BAT entry {i}"),
                    offset: Some(self.bat_offset + i * 8),
                    problem: "its block overlaps the BAT or the metadata".into(),
                });
            }
        }
        Ok(out)
    }
}
