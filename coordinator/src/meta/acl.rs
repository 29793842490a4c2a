//! POSIX ACLs as Linux keeps them in the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes (the kernel's
//! `posix_acl_xattr` layout: a little-endian version word, 2, then
//! entries of tag u16, permission u16, id u32), and what a new inode
//! inherits from its directory's default ACL (the kernel's
//! `posix_acl_create`).
//!
//! The kernel checks access against these ACLs itself (the mount asks it
//! to, FUSE's `POSIX_ACL`), but a filesystem that takes over the umask
//! (`DONT_MASK`) must apply a directory's default ACL to what is created
//! in it. It is done here, in the state machine, so that the create and
//! its inherited ACL are one command. There is no crate for this layout
//! (the `posix-acl` crate wraps libacl on a local path); it is small.

use super::{Xattrs, XATTR_SIZE_MAX};

/// The access ACL's attribute name.
pub const ACCESS: &str = "system.posix_acl_access";
/// The default ACL's attribute name (directories).
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// The entries of an ACL attribute's value; None if it is not one.
fn parse(b: &[u8]) -> Option<Vec<Entry>> {
    if b.len() < 4 || (b.len() - 4) % 8 != 0 || b.len() > XATTR_SIZE_MAX {
        return None;
    }
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION {
        return None;
    }
    b[4..]
        .chunks_exact(8)
        .map(|c| {
            let e = Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            };
            let known = matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER);
            (known && e.perm <= 7).then_some(e)
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// Whether `value` may be stored under `name`: an ACL attribute must hold
/// a well-formed ACL; any other name any value.
pub fn valid(name: &str, value: &[u8]) -> bool {
    if name != ACCESS && name != DEFAULT {
        return true;
    }
    parse(value).is_some_and(|e| {
        let count = |t| e.iter().filter(|x| x.tag == t).count();
        count(USER_OBJ) == 1 && count(GROUP_OBJ) == 1 && count(OTHER) == 1 && count(MASK) <= 1
    })
}

/// What a new inode with permission bits `mode` gets in a directory
/// whose attributes are `parent`, the creator's `umask` given: its mode
/// and the ACL attributes to set. With a default ACL in the directory the
/// umask is not applied and the default ACL, masked by `mode`, becomes the
/// inode's access ACL (kept as an attribute only if it says more than the
/// mode bits), and a directory inherits the default ACL itself; without
/// one the umask applies.
pub fn inherit(parent: &Xattrs, mode: u32, umask: u32, dir: bool) -> (u32, Vec<(String, Vec<u8>)>) {
    let Some(default) = parent.get(DEFAULT).filter(|v| valid(DEFAULT, v)) else {
        return (mode & !umask, Vec::new());
    };
    let Some(mut acl) = parse(default) else {
        return (mode & !umask, Vec::new());
    };
    // The kernel's posix_acl_create_masq.
    let mut mode = mode;
    let mut not_equiv = false;
    let (mut group_obj, mut mask_obj) = (None, None);
    for (i, e) in acl.iter_mut().enumerate() {
        match e.tag {
            USER_OBJ => {
                e.perm &= ((mode >> 6) & 7) as u16;
                mode &= (u32::from(e.perm) << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                e.perm &= (mode & 7) as u16;
                mode &= u32::from(e.perm) | !0o007;
            }
            MASK => {
                mask_obj = Some(i);
                not_equiv = true;
            }
            _ => {}
        }
    }
    if let Some(e) = mask_obj.or(group_obj).and_then(|i| acl.get_mut(i)) {
        e.perm &= ((mode >> 3) & 7) as u16;
        mode &= (u32::from(e.perm) << 3) | !0o070;
    }
    let mut set = Vec::new();
    if not_equiv {
        set.push((ACCESS.to_string(), encode(&acl)));
    }
    if dir {
        set.push((DEFAULT.to_string(), default.clone()));
    }
    (mode, set)
}

/// An access ACL set on an inode with mode `mode`: the mode's new
/// permission bits (the owner's, the mask's or else the owning group's,
/// the others'; the kernel's `posix_acl_update_mode`, which FUSE leaves to
/// the filesystem) and whether the ACL says more than them (else it is not
/// kept as an attribute: `posix_acl_equiv_mode`). None if `value` is not
/// an ACL.
pub fn mode_of_access(value: &[u8], mode: u32) -> Option<(u32, bool)> {
    let acl = parse(value)?;
    let perm = |t| acl.iter().find(|e| e.tag == t).map(|e| u32::from(e.perm));
    let group = perm(MASK).or(perm(GROUP_OBJ))?;
    let bits = (perm(USER_OBJ)? << 6) | (group << 3) | perm(OTHER)?;
    let extended = acl.iter().any(|e| matches!(e.tag, USER | GROUP | MASK));
    Some(((mode & !0o777) | bits, extended))
}

/// An access ACL after a `chmod` to `mode`: the owner's, the mask's (or
/// else the owning group's) and the others' permissions follow the new
/// mode (the kernel's `posix_acl_chmod`, which FUSE leaves to the
/// filesystem). None if `value` is not an ACL.
pub fn chmod(value: &[u8], mode: u32) -> Option<Vec<u8>> {
    let mut acl = parse(value)?;
    let has_mask = acl.iter().any(|e| e.tag == MASK);
    for e in &mut acl {
        match e.tag {
            USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
            MASK => e.perm = ((mode >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
            OTHER => e.perm = (mode & 7) as u16,
            _ => {}
        }
    }
    Some(encode(&acl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(e: &[(u16, u16, u32)]) -> Vec<u8> {
        encode(
            &e.iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_default_acl_is_inherited_masked_by_the_mode_and_the_umask_is_not_applied() {
        // default: user::rwx user:1000:rwx group::r-x mask::rwx other::---
        let d = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        let parent = Xattrs::from([(DEFAULT.to_string(), d.clone())]);
        // A file made with 0666 (umask 022 ignored): mask::rw-, other::---.
        let (mode, set) = inherit(&parent, 0o666, 0o022, false);
        assert_eq!(mode, 0o660);
        assert_eq!(set.len(), 1);
        let access = parse(&set[0].1).unwrap();
        assert!(access.contains(&Entry {
            tag: USER,
            perm: 7,
            id: 1000
        }));
        assert!(access.contains(&Entry {
            tag: MASK,
            perm: 6,
            id: 0
        }));
        assert!(access.contains(&Entry {
            tag: OTHER,
            perm: 0,
            id: 0
        }));
        // A directory also keeps the default ACL.
        let (mode, set) = inherit(&parent, 0o777, 0o022, true);
        assert_eq!(mode, 0o770);
        assert_eq!(
            set.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            [ACCESS, DEFAULT]
        );
        assert_eq!(set[1].1, d);
    }

    #[test]
    fn without_a_default_acl_the_umask_applies_and_a_minimal_one_adds_no_attribute() {
        assert_eq!(
            inherit(&Xattrs::new(), 0o666, 0o022, false),
            (0o644, vec![])
        );
        let minimal = acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 0, 0)]);
        let parent = Xattrs::from([(DEFAULT.to_string(), minimal)]);
        assert_eq!(inherit(&parent, 0o666, 0o077, false), (0o640, vec![]));
    }

    #[test]
    fn an_access_acl_sets_the_mode_and_a_chmod_sets_the_acl() {
        // u::rw-, u:1000:rwx, g::r--, m::rwx, o::---: the mask is the
        // group's bits; extended, so kept.
        let a = acl(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 4, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        assert_eq!(mode_of_access(&a, 0o104_644), Some((0o104_670, true)));
        // A minimal ACL is the mode itself: not kept.
        let m = acl(&[
            (USER_OBJ, 4, u32::MAX),
            (GROUP_OBJ, 7, u32::MAX),
            (OTHER, 6, u32::MAX),
        ]);
        assert_eq!(mode_of_access(&m, 0o100_644), Some((0o100_476, false)));
        // chmod 0750: owner rwx, mask r-x (the named user's rwx is masked
        // by it, as it stays), others none.
        let c = parse(&chmod(&a, 0o750).unwrap()).unwrap();
        let perms: Vec<(u16, u16)> = c.iter().map(|e| (e.tag, e.perm)).collect();
        assert_eq!(
            perms,
            [
                (USER_OBJ, 7),
                (USER, 7),
                (GROUP_OBJ, 4),
                (MASK, 5),
                (OTHER, 0)
            ]
        );
        assert_eq!(mode_of_access(b"bad", 0), None);
        assert_eq!(chmod(b"bad", 0), None);
    }

    #[test]
    fn malformed_acls_are_refused_and_never_panic() {
        assert!(!valid(ACCESS, b""));
        assert!(!valid(ACCESS, &[2, 0, 0, 0, 1]));
        assert!(
            !valid(ACCESS, &acl(&[(USER_OBJ, 7, 0)])),
            "no group or other entry"
        );
        assert!(!valid(
            ACCESS,
            &acl(&[(USER_OBJ, 9, 0), (GROUP_OBJ, 0, 0), (OTHER, 0, 0)])
        ));
        assert!(!valid(
            DEFAULT,
            &acl(&[(0x40, 7, 0), (GROUP_OBJ, 0, 0), (OTHER, 0, 0)])
        ));
        assert!(valid("user.anything", b"\xff"));
        let parent = Xattrs::from([(DEFAULT.to_string(), vec![1, 2, 3])]);
        assert_eq!(inherit(&parent, 0o666, 0o022, false), (0o644, vec![]));
    }
}
