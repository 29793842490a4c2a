//! The namespace: creating, linking, unlinking and renaming inodes, and
//! changing their attributes.

use super::*;

pub(super) fn check_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > MAX_NAME
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(MetaError::Invalid(format!("bad name {name:?}")));
    }
    Ok(())
}

/// An extended attribute's name: a known namespace, a name after it, and
/// not longer than Linux allows.
pub(super) fn check_xattr_name(name: &str) -> Result<(), MetaError> {
    if name.len() > XATTR_NAME_MAX {
        return Err(MetaError::TooBig(format!(
            "a name of {} bytes (at most {XATTR_NAME_MAX})",
            name.len()
        )));
    }
    let known = ["user.", "trusted.", "security.", "system."]
        .iter()
        .any(|p| name.len() > p.len() && name.starts_with(p));
    if !known || name.contains('\0') {
        return Err(MetaError::Invalid(format!(
            "extended attribute name {name:?} (user., trusted., security. or system.)"
        )));
    }
    Ok(())
}

impl Volume {
    pub(super) fn dir_mut(&mut self, ino: Ino) -> Result<&mut BTreeMap<String, Ino>, MetaError> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.body) {
            Some(Body::Dir(d)) => Ok(d),
            Some(_) => Err(MetaError::NotDir),
            None => Err(MetaError::NotFound),
        }
    }

    /// Makes `name` in `parent`; `[mode, uid, gid, rdev]`; with `umask`,
    /// the directory's default ACL or the umask applies to `mode`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &mut self,
        parent: Ino,
        name: &str,
        kind: Kind,
        [mode, uid, gid, rdev]: [u32; 4],
        umask: Option<u32>,
        target: String,
        now: u64,
    ) -> Result<Reply, MetaError> {
        check_name(name)?;
        if parent == ROOT && name == SNAPSHOTS_NAME {
            return Err(MetaError::Invalid(format!(
                "{SNAPSHOTS_NAME} in the root is reserved for snapshots"
            )));
        }
        let ino = self.next_ino;
        if ino >= LIVE_INO_LIMIT {
            return Err(MetaError::NoSpace);
        }
        let (mut mode, acls) = match (umask, self.inodes.get(&parent)) {
            (Some(u), Some(p)) if kind != Kind::Symlink => {
                acl::inherit(&p.xattrs, mode, u, kind == Kind::Dir)
            }
            _ => (mode, Vec::new()),
        };
        // In a set-group-ID directory a new inode takes the directory's
        // group, and a new directory the bit too (the kernel's
        // inode_init_owner, which FUSE leaves to the filesystem).
        let mut gid = gid;
        if let Some(p) = self
            .inodes
            .get(&parent)
            .filter(|p| p.attr.mode & 0o2000 != 0)
        {
            gid = p.attr.gid;
            if kind == Kind::Dir {
                mode |= 0o2000;
            }
        }
        let dir = self.dir_mut(parent)?;
        if dir.contains_key(name) {
            return Err(MetaError::Exists);
        }
        dir.insert(name.to_string(), ino);
        self.next_ino += 1;
        let (body, size, nlink) = match kind {
            Kind::Dir => (Body::Dir(BTreeMap::new()), 0, 2),
            Kind::File => (Body::File(BTreeMap::new()), 0, 1),
            Kind::Symlink => {
                let n = target.len() as u64;
                (Body::Symlink(target), n, 1)
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket => {
                (Body::Special, 0, 1)
            }
        };
        let rdev = if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            rdev
        } else {
            0
        };
        let attr = Attr {
            ino,
            kind,
            mode,
            uid,
            gid,
            size,
            nlink,
            mtime: now,
            ctime: now,
            atime: now,
            mtime_ns: 0,
            atime_ns: 0,
            rdev,
            xattrs: acls.len() as u32,
        };
        self.inodes.insert(
            ino,
            Inode {
                attr: attr.clone(),
                body,
                xattrs: acls.into_iter().collect(),
            },
        );
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.attr.touch_mtime(now);
            p.attr.ctime = now;
            if kind == Kind::Dir {
                p.attr.nlink += 1;
            }
        }
        Ok(Reply::Attr(attr))
    }

    pub(super) fn link(
        &mut self,
        ino: Ino,
        parent: Ino,
        name: &str,
        now: u64,
    ) -> Result<Reply, MetaError> {
        check_name(name)?;
        match self.inodes.get(&ino).map(|i| i.attr.kind) {
            None => return Err(MetaError::NotFound),
            Some(Kind::Dir) => return Err(MetaError::IsDir),
            Some(_) => {}
        }
        let dir = self.dir_mut(parent)?;
        if dir.contains_key(name) {
            return Err(MetaError::Exists);
        }
        dir.insert(name.to_string(), ino);
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        i.attr.nlink += 1;
        i.attr.ctime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Drops one link of `ino`; at zero links the inode goes and its
    /// extents are freed (or quarantined while leased).
    pub(super) fn drop_link(&mut self, ino: Ino, now: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        i.attr.nlink = i
            .attr
            .nlink
            .saturating_sub(if i.attr.kind == Kind::Dir { 2 } else { 1 });
        i.attr.ctime = now;
        if i.attr.nlink > 0 {
            return;
        }
        // A file some host still has open (it holds a lease on it) stays,
        // nameless, until its last lease ends (a close, or the lease
        // expiring after its host died): it may still be read and grow.
        if i.attr.kind == Kind::File && self.is_leased(ino) {
            return;
        }
        self.reclaim(ino);
    }

    /// Whether any host holds a lease on `ino`.
    pub(super) fn is_leased(&self, ino: Ino) -> bool {
        self.leases
            .range((ino, 0)..=(ino, u64::MAX))
            .next()
            .is_some()
    }

    /// Removes inode `ino` and frees its extents.
    pub(super) fn reclaim(&mut self, ino: Ino) {
        self.locks.remove(ino);
        if let Some(Inode {
            body: Body::File(ext),
            ..
        }) = self.inodes.remove(&ino)
        {
            let pieces: Vec<(u64, u64)> = ext.values().map(|e| (e.lun_off, e.len)).collect();
            self.free(ino, pieces);
        }
    }

    pub(super) fn unlink(
        &mut self,
        parent: Ino,
        name: &str,
        rmdir: bool,
        now: u64,
    ) -> Result<(), MetaError> {
        let ino = self.lookup(parent, name)?;
        let kind = self
            .inodes
            .get(&ino)
            .map(|i| i.attr.kind)
            .ok_or(MetaError::NotFound)?;
        match (rmdir, kind) {
            (true, Kind::Dir) => {
                if !self.readdir(ino)?.is_empty() {
                    return Err(MetaError::NotEmpty);
                }
            }
            (true, _) => return Err(MetaError::NotDir),
            (false, Kind::Dir) => return Err(MetaError::IsDir),
            (false, _) => {}
        }
        self.dir_mut(parent)?.remove(name);
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.attr.touch_mtime(now);
            p.attr.ctime = now;
            if kind == Kind::Dir {
                p.attr.nlink -= 1;
            }
        }
        self.drop_link(ino, now);
        Ok(())
    }

    /// Whether `ino` is `dir` or below it.
    pub(super) fn is_under(&self, mut ino: Ino, dir: Ino) -> bool {
        // Walk up through parents: find each directory's parent by search
        // (directories have exactly one name).
        let mut guard = 0;
        loop {
            if ino == dir {
                return true;
            }
            if ino == ROOT || guard > self.inodes.len() {
                return false;
            }
            guard += 1;
            let parent = self.inodes.iter().find_map(|(&p, i)| match &i.body {
                Body::Dir(d) if d.values().any(|&c| c == ino) => Some(p),
                _ => None,
            });
            match parent {
                Some(p) => ino = p,
                None => return false,
            }
        }
    }

    pub(super) fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        now: u64,
    ) -> Result<(), MetaError> {
        check_name(new_name)?;
        if new_parent == ROOT && new_name == SNAPSHOTS_NAME {
            return Err(MetaError::Invalid(format!(
                "{SNAPSHOTS_NAME} in the root is reserved for snapshots"
            )));
        }
        let ino = self.lookup(parent, name)?;
        self.dir_mut(new_parent)?;
        let kind = self
            .inodes
            .get(&ino)
            .map(|i| i.attr.kind)
            .ok_or(MetaError::NotFound)?;
        if kind == Kind::Dir && self.is_under(new_parent, ino) {
            return Err(MetaError::Loop);
        }
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            let old_kind = self
                .inodes
                .get(&old)
                .map(|i| i.attr.kind)
                .ok_or(MetaError::NotFound)?;
            match (kind, old_kind) {
                (Kind::Dir, Kind::Dir) if !self.readdir(old)?.is_empty() => {
                    return Err(MetaError::NotEmpty);
                }
                (Kind::Dir, Kind::Dir) => {}
                (Kind::Dir, _) => return Err(MetaError::NotDir),
                (_, Kind::Dir) => return Err(MetaError::IsDir),
                _ => {}
            }
            self.unlink(new_parent, new_name, old_kind == Kind::Dir, now)?;
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_string(), ino);
        if kind == Kind::Dir && parent != new_parent {
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.attr.nlink -= 1;
            }
            if let Some(p) = self.inodes.get_mut(&new_parent) {
                p.attr.nlink += 1;
            }
        }
        for d in [parent, new_parent] {
            if let Some(p) = self.inodes.get_mut(&d) {
                p.attr.touch_mtime(now);
                p.attr.ctime = now;
            }
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.attr.ctime = now;
        }
        Ok(())
    }

    /// Swaps the names `parent/name` and `new_parent/new_name` (both
    /// exist; either may be a directory).
    pub(super) fn exchange(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        now: u64,
    ) -> Result<(), MetaError> {
        let a = self.lookup(parent, name)?;
        let b = self.lookup(new_parent, new_name)?;
        if is_snapshot_ino(a) || is_snapshot_ino(b) || a == SNAPSHOTS_DIR || b == SNAPSHOTS_DIR {
            return Err(MetaError::Invalid("snapshots are read-only".into()));
        }
        if a == b {
            return Ok(());
        }
        let kind = |v: &Volume, i: Ino| {
            v.inodes
                .get(&i)
                .map(|n| n.attr.kind)
                .ok_or(MetaError::NotFound)
        };
        let (ka, kb) = (kind(self, a)?, kind(self, b)?);
        // A directory may not end up below itself.
        if parent != new_parent
            && ((ka == Kind::Dir && self.is_under(new_parent, a))
                || (kb == Kind::Dir && self.is_under(parent, b)))
        {
            return Err(MetaError::Loop);
        }
        self.dir_mut(parent)?.insert(name.to_string(), b);
        self.dir_mut(new_parent)?.insert(new_name.to_string(), a);
        if parent != new_parent && ka != kb {
            // A directory moved between parents takes its ".." link along.
            let (from, to) = if ka == Kind::Dir {
                (parent, new_parent)
            } else {
                (new_parent, parent)
            };
            if let Some(p) = self.inodes.get_mut(&from) {
                p.attr.nlink -= 1;
            }
            if let Some(p) = self.inodes.get_mut(&to) {
                p.attr.nlink += 1;
            }
        }
        for d in [parent, new_parent, a, b] {
            if let Some(p) = self.inodes.get_mut(&d) {
                if d == parent || d == new_parent {
                    p.attr.touch_mtime(now);
                }
                p.attr.ctime = now;
            }
        }
        Ok(())
    }

    /// Sets extended attribute `name` of `ino`.
    pub(super) fn set_xattr(
        &mut self,
        ino: Ino,
        name: String,
        value: Vec<u8>,
        how: XattrSet,
        now: u64,
    ) -> Result<Reply, MetaError> {
        check_xattr_name(&name)?;
        if !acl::valid(&name, &value) {
            return Err(MetaError::Invalid(format!(
                "{name} does not hold a POSIX ACL"
            )));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(MetaError::TooBig(format!(
                "a value of {} bytes (at most {XATTR_SIZE_MAX})",
                value.len()
            )));
        }
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        let exists = i.xattrs.contains_key(&name);
        match how {
            XattrSet::Create if exists => return Err(MetaError::Exists),
            XattrSet::Replace if !exists => return Err(MetaError::NoData),
            _ => {}
        }
        let used: usize = i
            .xattrs
            .iter()
            .filter(|(k, _)| **k != name)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if used + name.len() + value.len() > XATTR_INODE_MAX {
            return Err(MetaError::NoSpace);
        }
        // An access ACL sets the mode's permission bits; one that says
        // no more than them is not kept (as a kernel filesystem does).
        match acl::mode_of_access(&value, i.attr.mode).filter(|_| name == acl::ACCESS) {
            Some((mode, false)) => {
                i.attr.mode = mode;
                i.xattrs.remove(&name);
            }
            Some((mode, true)) => {
                i.attr.mode = mode;
                i.xattrs.insert(name, value);
            }
            None => {
                i.xattrs.insert(name, value);
            }
        }
        i.attr.xattrs = i.xattrs.len() as u32;
        i.attr.ctime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Removes extended attribute `name` of `ino`.
    pub(super) fn remove_xattr(
        &mut self,
        ino: Ino,
        name: &str,
        now: u64,
    ) -> Result<Reply, MetaError> {
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        if i.xattrs.remove(name).is_none() {
            return Err(MetaError::NoData);
        }
        i.attr.xattrs = i.xattrs.len() as u32;
        i.attr.ctime = now;
        Ok(Reply::Attr(i.attr.clone()))
    }

    /// Changes attributes; `[mtime, atime]` set explicitly.
    pub(super) fn setattr(
        &mut self,
        ino: Ino,
        [mode, uid, gid]: [Option<u32>; 3],
        size: Option<u64>,
        [mtime, atime]: [Option<(u64, u32)>; 2],
        now: u64,
    ) -> Result<Reply, MetaError> {
        let i = self.inodes.get_mut(&ino).ok_or(MetaError::NotFound)?;
        // Refuse before changing anything: a command applies whole or not.
        if size.is_some() && !matches!(i.body, Body::File(_)) {
            return Err(MetaError::IsDir);
        }
        if let Some(m) = mode {
            i.attr.mode = m;
            // The access ACL follows a chmod (owner, mask, others).
            if let Some(a) = i.xattrs.get(acl::ACCESS).and_then(|v| acl::chmod(v, m)) {
                i.xattrs.insert(acl::ACCESS.to_string(), a);
            }
        }
        if let Some(u) = uid {
            i.attr.uid = u;
        }
        if let Some(g) = gid {
            i.attr.gid = g;
        }
        i.attr.ctime = now;
        let mut freed = Vec::new();
        if let Some(new) = size {
            let Body::File(ext) = &mut i.body else {
                return Err(MetaError::IsDir);
            };
            // Cut extents at the new size; free what lies beyond.
            let keys: Vec<u64> = ext.keys().copied().collect();
            for k in keys {
                let Some(e) = ext.get(&k).copied() else {
                    continue;
                };
                if e.file_off >= new {
                    ext.remove(&k);
                    freed.push((e.lun_off, e.len));
                } else if e.file_off + e.len > new {
                    let keep = new - e.file_off;
                    ext.insert(k, Extent { len: keep, ..e });
                    freed.push((e.lun_off + keep, e.len - keep));
                }
            }
            i.attr.size = new;
            i.attr.touch_mtime(now);
        }
        // Nanoseconds beyond the millisecond are the caller's word: kept
        // below 1 ms.
        if let Some((t, ns)) = mtime {
            i.attr.mtime = t;
            i.attr.mtime_ns = ns % 1_000_000;
        }
        if let Some((t, ns)) = atime {
            i.attr.atime = t;
            i.attr.atime_ns = ns % 1_000_000;
        }
        let attr = i.attr.clone();
        self.free(ino, freed);
        Ok(Reply::Attr(attr))
    }
}
