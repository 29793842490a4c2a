//! Opening an image: the footer (or its copy after a crash), the dynamic
//! header and BAT with their consistency checks, and the parent chain of a
//! differencing disk.

use super::*;

impl<I: BlockIo> Vhd<I> {
    /// Opens an image on `io`. `path` locates the parents of a
    /// differencing disk (none can be opened without it).
    pub fn open_on(io: I, name: &str, path: Option<&Path>, opts: &OpenOptions) -> Result<Self> {
        let mut visited = Vec::new();
        Self::open_chain(io, name, path, opts, &mut visited)
    }

    fn open_chain(
        io: I,
        name: &str,
        path: Option<&Path>,
        opts: &OpenOptions,
        visited: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let len = io.len().ctx(name, || "get length".into(), 0)?;
        let (footer, footer_recovered) = read_footer(&io, name, len)?;
        let dt = footer.disk_type();
        let size = footer.virtual_size();
        let mut vhd = Vhd {
            io,
            name: name.to_string(),
            path: path.map(Path::to_path_buf),
            footer,
            size,
            writable: opts.write,
            sparse: None,
            parent: None,
            footer_recovered,
        };
        if dt == DiskType::Fixed {
            if len < size + OLD_FOOTER_SIZE as u64 {
                return Err(Error::Corrupt {
                    file: name.into(),
                    structure: "footer".into(),
                    offset: len.saturating_sub(FOOTER_SIZE as u64),
                    problem: format!("fixed disk of {size} bytes in a file of {len} bytes"),
                });
            }
            return Ok(vhd);
        }
        vhd.sparse = Some(vhd.load_sparse(len)?);
        if dt == DiskType::Differencing {
            vhd.parent = Some(Box::new(vhd.open_parent(opts, visited)?));
        }
        if footer_recovered && opts.write {
            vhd.repair_footer()?;
        }
        Ok(vhd)
    }

    fn load_sparse(&self, len: u64) -> Result<Sparse> {
        let name = &self.name;
        let hoff = self.footer.data_offset;
        let corrupt = |structure: &str, offset: u64, problem: String| Error::Corrupt {
            file: name.clone(),
            structure: structure.into(),
            offset,
            problem,
        };
        if hoff % SECTOR != 0 || hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
            return Err(corrupt(
                "footer",
                len.saturating_sub(512),
                format!("data offset {hoff} is not a header inside the file"),
            ));
        }
        let mut hb = vec![0u8; HEADER_SIZE];
        self.io
            .read_at(&mut hb, hoff)
            .ctx(name, || "read dynamic header".into(), hoff)?;
        let h =
            DynHeader::parse(&hb).map_err(|e| corrupt("dynamic header", hoff, e.to_string()))?;
        let bs = u64::from(h.block_size);
        let needed = self.size.div_ceil(bs);
        if h.max_table_entries > MAX_BAT_ENTRIES || u64::from(h.max_table_entries) < needed {
            return Err(corrupt(
                "dynamic header",
                hoff,
                format!(
                    "{} BAT entries for a disk that needs {needed}",
                    h.max_table_entries
                ),
            ));
        }
        let toff = h.table_offset;
        let bat_bytes = u64::from(h.max_table_entries) * 4;
        if toff % SECTOR != 0 || toff.checked_add(bat_bytes).is_none_or(|e| e > len) {
            return Err(corrupt(
                "dynamic header",
                hoff,
                format!("BAT at {toff} ({bat_bytes} bytes) is outside the file of {len} bytes"),
            ));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        self.io
            .read_at(&mut raw, toff)
            .ctx(name, || "read BAT".into(), toff)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_size = h.bitmap_size();
        let footprint = bitmap_size + bs;
        // Every allocated block lies inside the file, clear of the
        // metadata, and overlaps no other block.
        let regions = metadata_regions(hoff, &h);
        let meta_end = regions.iter().map(|r| r.1).max().unwrap_or(0);
        let mut starts: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let off = u64::from(e) * SECTOR;
            let what = || format!("BAT entry {i}");
            if i as u64 >= needed {
                return Err(corrupt(
                    &what(),
                    toff + 4 * i as u64,
                    format!("block {i} is beyond the disk's {needed} blocks"),
                ));
            }
            if off + footprint > len {
                return Err(corrupt(&what(), toff + 4 * i as u64, format!("block at {off} ({footprint} bytes) runs past the end of the file ({len} bytes)")));
            }
            if let Some(r) = regions.iter().find(|r| off < r.1 && off + footprint > r.0) {
                return Err(corrupt(
                    &what(),
                    toff + 4 * i as u64,
                    format!("block at {off} overlaps the {} at {}..{}", r.2, r.0, r.1),
                ));
            }
            starts.push((off, i));
        }
        starts.sort_unstable();
        for w in starts.windows(2) {
            if w[0].0 + footprint > w[1].0 {
                return Err(corrupt(
                    &format!("BAT entry {}", w[1].1),
                    toff + 4 * w[1].1 as u64,
                    format!(
                        "block {} at {} overlaps block {} at {}",
                        w[1].1, w[1].0, w[0].1, w[0].0
                    ),
                ));
            }
        }
        // The next block goes where the footer is, or after the last block
        // if a crash left data beyond it.
        let mut end = if self.footer_recovered {
            len.next_multiple_of(SECTOR)
        } else {
            len - FOOTER_SIZE as u64
        };
        if let Some((last, _)) = starts.last() {
            end = end.max(last + footprint);
        }
        end = end.max(meta_end.min(len.next_multiple_of(SECTOR)));
        Ok(Sparse {
            header_offset: hoff,
            block_size: bs,
            bitmap_size,
            bat: RwLock::new(bat),
            bitmaps: RwLock::new(HashMap::new()),
            end: Mutex::new(end),
            header: h,
        })
    }

    fn open_parent(&self, opts: &OpenOptions, visited: &mut Vec<PathBuf>) -> Result<ParentDisk> {
        let Some(sp) = self.sparse.as_ref() else {
            return Err(Error::Invalid("not a differencing disk".into()));
        };
        let Some(path) = self.path.as_ref() else {
            return Err(Error::ParentNotFound {
                child: self.name.clone(),
                tried: Vec::new(),
            });
        };
        let me = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        if visited.contains(&me) {
            return Err(Error::ParentLoop {
                child: self.name.clone(),
                repeated: me.display().to_string(),
            });
        }
        visited.push(me);
        if visited.len() > MAX_CHAIN {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: format!("parent chain deeper than {MAX_CHAIN}"),
            });
        }
        let tried = parent::candidates(&self.io, &sp.header, path);
        let Some(found) = tried.iter().find(|p| p.is_file()) else {
            return Err(Error::ParentNotFound {
                child: self.name.clone(),
                tried,
            });
        };
        let canon = std::fs::canonicalize(found).unwrap_or_else(|_| found.clone());
        if visited.contains(&canon) {
            return Err(Error::ParentLoop {
                child: self.name.clone(),
                repeated: canon.display().to_string(),
            });
        }
        let pname = found.display().to_string();
        let pfile = open_file(found, opts.write_parent).ctx(&pname, || "open parent".into(), 0)?;
        let popts = OpenOptions {
            write: opts.write_parent,
            write_parent: false,
            ..opts.clone()
        };
        let p = Vhd::<Box<dyn BlockIo>>::open_chain(
            Box::new(pfile),
            &pname,
            Some(found),
            &popts,
            visited,
        )?;
        if p.footer.unique_id != sp.header.parent_unique_id {
            return Err(Error::ParentMismatch {
                child: self.name.clone(),
                parent: pname,
                problem: format!(
                    "unique id {} but the child was made from {}",
                    crate::format_uuid(&p.footer.unique_id),
                    crate::format_uuid(&sp.header.parent_unique_id)
                ),
            });
        }
        if p.footer.timestamp != sp.header.parent_timestamp && !opts.ignore_parent_timestamp {
            return Err(Error::ParentMismatch {
                child: self.name.clone(),
                parent: pname,
                problem: format!(
                    "time stamp {} but the child recorded {} (the parent changed after the child was made; --ignore-parent-timestamp opens it anyway)",
                    p.footer.timestamp, sp.header.parent_timestamp
                ),
            });
        }
        Ok(p)
    }

    /// Puts the footer back at the end of a file whose end footer a crash
    /// destroyed (the copy at offset 0 was used to open it).
    fn repair_footer(&mut self) -> Result<()> {
        let Some(sp) = self.sparse.as_ref() else {
            return Ok(());
        };
        let end = *sp.end.lock().map_err(|_| lock_err(&self.name))?;
        let fb = self.footer.to_bytes();
        self.io
            .write_at(&fb, end)
            .ctx(&self.name, || "repair footer".into(), end)?;
        self.io.set_len(end + FOOTER_SIZE as u64).ctx(
            &self.name,
            || "truncate after repaired footer".into(),
            end,
        )?;
        self.io.flush().ctx(&self.name, || "flush".into(), 0)?;
        self.footer_recovered = false;
        Ok(())
    }
}

/// Reads the footer at the end of the file (512 or, for very old images,
/// 511 bytes), falling back to the copy at offset 0 of a sparse disk.
/// Returns whether the copy had to be used.
fn read_footer<I: BlockIo>(io: &I, name: &str, len: u64) -> Result<(Footer, bool)> {
    if len < OLD_FOOTER_SIZE as u64 {
        return Err(Error::NotVhd {
            file: name.into(),
            reason: format!("only {len} bytes long"),
        });
    }
    let tail = len.min(FOOTER_SIZE as u64);
    let mut b = vec![0u8; tail as usize];
    io.read_at(&mut b, len - tail)
        .ctx(name, || "read footer".into(), len - tail)?;
    let end_err = match crate::footer::Footer::parse(&b) {
        Ok(f) => return Ok((f, false)),
        Err(e) => e,
    };
    // 511-byte footer: the cookie one byte later.
    if b.len() == FOOTER_SIZE {
        if let Ok(f) = Footer::parse(&b[1..]) {
            return Ok((f, false));
        }
    }
    let mut c = [0u8; FOOTER_SIZE];
    if len >= FOOTER_SIZE as u64 {
        io.read_at(&mut c, 0)
            .ctx(name, || "read footer copy".into(), 0)?;
        if let Ok(f) = Footer::parse(&c) {
            if f.disk_type().is_sparse() {
                return Ok((f, true));
            }
        }
    }
    if end_err == crate::footer::FooterError::Cookie && &c[..8] != crate::footer::COOKIE {
        return Err(Error::NotVhd {
            file: name.into(),
            reason: "no `conectix` footer at its end or start".into(),
        });
    }
    Err(Error::Corrupt {
        file: name.into(),
        structure: "footer".into(),
        offset: len - tail,
        problem: end_err.to_string(),
    })
}

/// Where the metadata of a sparse disk lies: footer copy, header, BAT,
/// parent locators.
pub(super) fn metadata_regions(header_offset: u64, h: &DynHeader) -> Vec<(u64, u64, &'static str)> {
    let mut r = vec![
        (0, SECTOR, "footer copy"),
        (
            header_offset,
            header_offset + HEADER_SIZE as u64,
            "dynamic header",
        ),
        (h.table_offset, h.table_offset + h.bat_size(), "BAT"),
    ];
    for l in h.locators.iter().filter(|l| l.code != 0) {
        r.push((
            l.data_offset,
            l.data_offset.saturating_add(l.space_bytes()),
            "parent locator",
        ));
    }
    r
}
