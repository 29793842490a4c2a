//! `csv-bench`: the benchmark driver behind `tools/bench/run <suite>`.
//!
//! Each suite runs our code and its peer on the same work in the same run,
//! alternating them, and prints a Markdown table with a `ratio` column
//! oriented so that above 1.0 means we are better; the last line is
//! `worst ratio: <x>`. Not a test: figures are recorded in
//! docs/PERFORMANCE.md, never asserted.
//!
//! The suite is a subcommand (`csv-bench vhd --rounds 5`); each suite
//! module holds its options (`Args`, parsed by clap) and its `run`.

use anyhow::Result;
use clap::Parser;

mod fs_suite;
mod iscsi_suite;
mod locks_suite;
mod meta_suite;
mod qemu_suite;
mod redirect_suite;
mod snap_suite;
mod table;
mod vhd_suite;
mod vmm_suite;

/// The benchmark driver behind `tools/bench/run <suite>`.
///
/// Each suite runs our code and its peer on the same work in the same run,
/// alternating them, and prints a Markdown table with a `ratio` column
/// oriented so that above 1.0 means we are better; the last line is
/// `worst ratio: <x>`. Progress and raw figures go to stderr. Not a test:
/// figures are recorded in docs/PERFORMANCE.md, never asserted.
///
/// Run it through `tools/bench/run <suite> [options]`, which installs what
/// the suite needs and builds csv-bench, csvctl, csvd and csv-vmm in
/// release mode first.
#[derive(Debug, Parser)]
#[command(name = "csv-bench", version)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

/// The suites, one subcommand each.
#[derive(Debug, clap::Subcommand)]
enum Suite {
    /// Our VHD crate against `qemu-img bench` (vpc driver), O_DIRECT,
    /// queue depth 32 (about 4 min).
    ///
    /// Reads, rewrites and first (allocating) writes on fixed and dynamic
    /// images of 1 to 16 GiB, with the same request sequence on both sides;
    /// figures in IOPS or MiB/s, medians of interleaved runs.
    Vhd(vhd_suite::Args),
    /// Our iSCSI initiator against libiscsi's `iscsi-perf` on the same tgtd
    /// LUNs on loopback (about 4 min).
    ///
    /// 4 KiB random and 128 KiB sequential reads on a null LUN and a file
    /// LUN, at QD1 and QD32; writes (which iscsi-perf cannot do) show our
    /// figures only. CPU per request of both initiators goes to stderr.
    Iscsi(iscsi_suite::Args),
    /// Metadata operations through a 3-host csvd quorum against a 3-member
    /// etcd 3.4 cluster on loopback (about 2 min).
    ///
    /// create+close, lookup and setattr with 1 and 16 clients (ops/s, p50,
    /// p99), then the longest gap a creating client sees while the leader
    /// is killed `--kills` times.
    Meta(meta_suite::Args),
    /// fio through a 3-host cluster's `/ClusterStorage` mount against the
    /// same fio job on a raw file on the same disk (about 4 min).
    ///
    /// 1 MiB sequential and 4 KiB random reads and writes with O_DIRECT on
    /// a 1 GiB file, and file create+close per second against the local
    /// filesystem.
    Fs(fs_suite::Args),
    /// A host's I/O redirected through a peer (`BlockRedirected`) against
    /// its own iSCSI path (`Direct`) on one tgtd LUN (about 3 min).
    ///
    /// The `fs` suite's fio jobs both ways, then the longest write stall an
    /// application sees when the host's SAN path is cut, over `--cuts`
    /// cuts (no peer).
    Redirect(redirect_suite::Args),
    /// csv-vmm against `qemu-system-x86_64 -enable-kvm` on the csv test
    /// guest (about 4 min).
    ///
    /// Time from process start to the guest's first heartbeat, and live
    /// migration on loopback (downtime seen by an outside heartbeat
    /// observer, total time) of 256 MiB and 1 GiB guests, idle and dirtying
    /// 64 MiB/s. Needs qemu-system-x86_64 (`tools/setup.sh --qemu-system`).
    Vmm(vmm_suite::Args),
    /// Real guests in QEMU with csv's disk backend (about 6 min under TCG).
    ///
    /// fio inside the Linux test guest on csv's vhost-user-blk backend
    /// (a dynamic VHD on a csvd mount) against QEMU's own vpc driver on the
    /// same mount and against QEMU on a raw local file (cache=none,
    /// aio=native); boot time; live-migration downtime and total time with
    /// the write-lease hand-over against the same QEMU migration without
    /// one. Needs `tools/setup.sh --qemu-system` (QEMU, the guest).
    Qemu(qemu_suite::Args),
    /// fio writes through the mount right after five snapshots against no
    /// snapshot, and the write-hold time of a snapshot under load on three
    /// hosts (about 2 min).
    ///
    /// With snapshots every 64 KiB unit is shared when the job starts, so
    /// each first write to one is redirected: the worst case. The
    /// write-hold rows (p50 and max over `--count` snapshots) have no peer.
    Snap(snap_suite::Args),
    /// File locks through a 2-host cluster's mounts against the same calls
    /// on local ext4 (about 1 min).
    ///
    /// Uncontended lock+unlock pairs per second and the lock call's p50
    /// and p99; a write lock on one host and a read lock on the other
    /// taken in turn (round trips per second); create+close per second.
    Locks(locks_suite::Args),
}

fn main() -> Result<()> {
    match Cli::parse().suite {
        Suite::Vhd(a) => vhd_suite::run(a),
        Suite::Iscsi(a) => iscsi_suite::run(a),
        Suite::Meta(a) => meta_suite::run(a),
        Suite::Fs(a) => fs_suite::run(a),
        Suite::Redirect(a) => redirect_suite::run(a),
        Suite::Vmm(a) => vmm_suite::run(a),
        Suite::Qemu(a) => qemu_suite::run(a),
        Suite::Snap(a) => snap_suite::run(a),
        Suite::Locks(a) => locks_suite::run(a),
    }
}
