//! Dropping the privileges a process does not need (csvd and every
//! `csv-vmm` it starts, with the `caps` crate): afterwards the process
//! keeps only the capabilities asked for (effective and permitted), none
//! beyond them can come back (bounding set), and nothing it executes
//! gains any (`no_new_privs`).

use caps::{CapSet, Capability, CapsHashSet};

/// Why privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A capability set.
    #[error("changing the {set:?} capability set")]
    Caps {
        /// Which set.
        set: CapSet,
        /// Why.
        #[source]
        source: caps::errors::CapsError,
    },
    /// `no_new_privs`.
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
}

/// Keeps only `keep` (of what the process holds); what it did, for the
/// log. Call it before any thread starts: capabilities are per thread,
/// and threads started later inherit them.
pub fn drop_all_but(keep: &[Capability]) -> Result<String, PrivilegeError> {
    let err = |set| move |source| PrivilegeError::Caps { set, source };
    let keep: CapsHashSet = keep.iter().copied().collect();
    let mut dropped = 0;
    for cap in caps::all() {
        // A capability this kernel does not know cannot be dropped; fine.
        if !keep.contains(&cap) && caps::drop(None, CapSet::Bounding, cap).is_ok() {
            dropped += 1;
        }
    }
    // Only what it holds: a process without a capability cannot keep it.
    let held = caps::read(None, CapSet::Permitted).map_err(err(CapSet::Permitted))?;
    let kept: CapsHashSet = keep.intersection(&held).copied().collect();
    // The effective set must stay within the permitted one: lower it first.
    caps::set(None, CapSet::Effective, &kept).map_err(err(CapSet::Effective))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err(CapSet::Permitted))?;
    caps::clear(None, CapSet::Inheritable).map_err(err(CapSet::Inheritable))?;
    nix::sys::prctl::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)?;
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(format!(
        "kept capabilities [{}], dropped {dropped} from the bounding set, no_new_privs set",
        names.join(", ")
    ))
}
