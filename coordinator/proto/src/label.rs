//! Words for the schema's enumerations: what `csvctl`, the console and
//! the logs print, and what an operator types (`csvctl drill`, snapshot
//! phases). One table per enumeration, so a word and its value cannot
//! drift apart.

use crate::{
    BlockOpKind, FaultKind, FileOpKind, IoMode, LeaseChange, NodeKind, ProgressState, RaftRole,
    RedirectMode, SnapshotPhase, SnapshotSetState, VmState,
};

/// An enumeration with a word for each value.
pub trait Label: Sized + Copy + PartialEq + 'static {
    /// Each value and its word (the unspecified value's word is empty).
    const WORDS: &'static [(Self, &'static str)];

    /// The value's word.
    fn label(self) -> &'static str {
        Self::WORDS
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("", |(_, w)| w)
    }

    /// The value a word names (None: no such word).
    fn parse(word: &str) -> Option<Self> {
        Self::WORDS
            .iter()
            .find(|(_, w)| !w.is_empty() && *w == word)
            .map(|(v, _)| *v)
    }

    /// Every word, for an error message ("one of ...").
    fn words() -> String {
        Self::WORDS
            .iter()
            .filter(|(_, w)| !w.is_empty())
            .map(|(_, w)| *w)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The word of an enumeration field as prost keeps it (`i32`); an
/// unknown value reads as the unspecified one.
pub fn label<E: Label + TryFrom<i32>>(value: i32) -> &'static str {
    E::try_from(value).map_or("", Label::label)
}

/// The value of a word, as prost keeps it (`i32`).
pub fn parse<E: Label + Into<i32>>(word: &str) -> Option<i32> {
    E::parse(word).map(Into::into)
}

impl Label for IoMode {
    const WORDS: &'static [(Self, &'static str)] = &[
        (IoMode::Unspecified, ""),
        (IoMode::Direct, "Direct"),
        (IoMode::BlockRedirected, "BlockRedirected"),
        (IoMode::FileSystemRedirected, "FileSystemRedirected"),
        (IoMode::Fenced, "Fenced"),
        (IoMode::Unmounted, "Unmounted"),
    ];
}

impl Label for VmState {
    const WORDS: &'static [(Self, &'static str)] = &[
        (VmState::Unspecified, ""),
        (VmState::Starting, "starting"),
        (VmState::Running, "running"),
        (VmState::Paused, "paused"),
        (VmState::Stopping, "stopping"),
        (VmState::Failed, "failed"),
        (VmState::Incoming, "incoming"),
        (VmState::Migrating, "migrating"),
        (VmState::Saved, "saved"),
        (VmState::Stopped, "stopped"),
        (VmState::Unknown, "unknown"),
    ];
}

impl Label for RaftRole {
    const WORDS: &'static [(Self, &'static str)] = &[
        (RaftRole::Unspecified, ""),
        (RaftRole::Leader, "leader"),
        (RaftRole::Follower, "follower"),
        (RaftRole::Candidate, "candidate"),
        (RaftRole::PreCandidate, "pre-candidate"),
    ];
}

impl Label for ProgressState {
    const WORDS: &'static [(Self, &'static str)] = &[
        (ProgressState::Unspecified, ""),
        (ProgressState::Probe, "probe"),
        (ProgressState::Replicate, "replicate"),
        (ProgressState::Snapshot, "snapshot"),
    ];
}

impl Label for LeaseChange {
    const WORDS: &'static [(Self, &'static str)] = &[
        (LeaseChange::Unspecified, ""),
        (LeaseChange::Granted, "granted"),
        (LeaseChange::HandedIn, "handed-in"),
        (LeaseChange::Released, "released"),
        (LeaseChange::Revoked, "revoked"),
        (LeaseChange::HandedOff, "handed-off"),
        (LeaseChange::Expired, "expired"),
    ];
}

impl Label for SnapshotSetState {
    const WORDS: &'static [(Self, &'static str)] = &[
        (SnapshotSetState::Unspecified, ""),
        (SnapshotSetState::Preparing, "preparing"),
        (SnapshotSetState::Frozen, "frozen"),
        (SnapshotSetState::Complete, "complete"),
        (SnapshotSetState::Failed, "failed"),
    ];
}

impl Label for SnapshotPhase {
    const WORDS: &'static [(Self, &'static str)] = &[
        (SnapshotPhase::Unspecified, ""),
        (SnapshotPhase::Prepare, "prepare"),
        (SnapshotPhase::Freeze, "freeze"),
        (SnapshotPhase::Thaw, "thaw"),
        (SnapshotPhase::Complete, "complete"),
        (SnapshotPhase::Abort, "abort"),
    ];
}

impl Label for FaultKind {
    const WORDS: &'static [(Self, &'static str)] = &[
        (FaultKind::Unspecified, ""),
        (FaultKind::SanCut, "san-cut"),
        (FaultKind::SanSlow, "san-slow"),
        (FaultKind::NetCut, "net-cut"),
        (FaultKind::Clock, "clock"),
        (FaultKind::Crash, "crash"),
        (FaultKind::Heal, "heal"),
    ];
}

impl Label for NodeKind {
    const WORDS: &'static [(Self, &'static str)] = &[
        (NodeKind::Directory, "directory"),
        (NodeKind::File, "file"),
        (NodeKind::Symlink, "symlink"),
    ];
}

impl Label for RedirectMode {
    const WORDS: &'static [(Self, &'static str)] = &[
        (RedirectMode::Block, "block"),
        (RedirectMode::FileSystem, "filesystem"),
    ];
}

impl Label for BlockOpKind {
    const WORDS: &'static [(Self, &'static str)] = &[
        (BlockOpKind::Unspecified, ""),
        (BlockOpKind::Read, "read"),
        (BlockOpKind::Write, "write"),
        (BlockOpKind::Flush, "flush"),
    ];
}

impl Label for FileOpKind {
    const WORDS: &'static [(Self, &'static str)] = &[
        (FileOpKind::Unspecified, ""),
        (FileOpKind::Open, "open"),
        (FileOpKind::Read, "read"),
        (FileOpKind::Write, "write"),
        (FileOpKind::Sync, "sync"),
        (FileOpKind::Release, "release"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<E: Label + std::fmt::Debug>() {
        for (v, w) in E::WORDS {
            if !w.is_empty() {
                assert_eq!(E::parse(w), Some(*v), "{w}");
            }
            assert_eq!(v.label(), *w);
        }
        assert_eq!(E::parse("no such word"), None);
        assert_eq!(E::parse(""), None, "the empty word names nothing");
    }

    #[test]
    fn every_word_names_its_value_and_back() {
        round_trip::<IoMode>();
        round_trip::<VmState>();
        round_trip::<RaftRole>();
        round_trip::<ProgressState>();
        round_trip::<LeaseChange>();
        round_trip::<SnapshotSetState>();
        round_trip::<SnapshotPhase>();
        round_trip::<FaultKind>();
        round_trip::<NodeKind>();
        round_trip::<RedirectMode>();
        round_trip::<BlockOpKind>();
        round_trip::<FileOpKind>();
    }

    #[test]
    fn a_field_value_gets_its_word() {
        assert_eq!(
            label::<IoMode>(IoMode::BlockRedirected as i32),
            "BlockRedirected"
        );
        assert_eq!(label::<IoMode>(999), "");
        assert_eq!(
            parse::<FaultKind>("san-cut"),
            Some(FaultKind::SanCut as i32)
        );
        assert!(FaultKind::words().starts_with("san-cut, san-slow"));
    }
}
