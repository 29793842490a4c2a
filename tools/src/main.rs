//! `csvctl`: the operator's command line for a csv cluster.
//!
//! One module per verb group; `main` parses the arguments and hands them
//! to the group. Errors are printed once, with their chain of causes, and
//! give a non-zero exit status.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cluster_cmd;
mod drill;
mod inventory_cmd;
mod p2v_cmd;
mod san_cmd;
mod setup_cmd;
mod snapshot_cmd;
mod template_cmd;
mod up_cmd;
mod validate_cmd;
mod vhd_cmd;
mod vm_cmd;
mod vm_console;
mod when;

/// Cluster Shared Volumes for Linux and KVM.
#[derive(Debug, Parser)]
#[command(
    name = "csvctl",
    version,
    about = "The operator's command line of a csv cluster: VHD disks, the SAN, the cluster, its volumes, VM roles, snapshots",
    long_about = None,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, check and transform VHD disk images (the jobs of
    /// Hyper-V's New-VHD, Get-VHD, Test-VHD, Convert-VHD, Resize-VHD,
    /// Merge-VHD and Optimize-VHD).
    #[command(subcommand)]
    Vhd(vhd_cmd::VhdCommand),
    /// Copy a running Linux machine's disk into a VHD (physical to
    /// virtual): its mounted filesystems are frozen (FIFREEZE) for the
    /// copy so each is consistent, the disk is read with O_DIRECT, blocks
    /// of zeros stay unallocated, and unreadable ranges are reported with
    /// their offsets (exit status 1). Example:
    ///   csvctl p2v /dev/sdb /ClusterStorage/Volume1/oldserver.vhd
    #[command(verbatim_doc_comment)]
    P2v(p2v_cmd::P2vArgs),
    /// Look at the SAN through this host's own iSCSI initiator: discover
    /// targets, list LUNs, show persistent reservations.
    #[command(subcommand)]
    San(san_cmd::SanCommand),
    /// Create a cluster key, show the hosts' Raft groups, add hosts.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Add (format), list and remove volumes; show how each host reaches
    /// them; redirect a host's I/O; move a volume's coordinator.
    #[command(subcommand)]
    Volume(cluster_cmd::VolumeCommand),
    /// VM roles of the cluster: add, list, remove, and rate the hosts for
    /// one (Add-ClusterVirtualMachineRole and friends).
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// A library of golden VHDs on the volumes: add, list (with the disks
    /// made from each), remove; `csvctl vm add VM --template NAME` makes a
    /// VM's disk as a differencing child of one, in a moment.
    #[command(subcommand)]
    Template(template_cmd::TemplateCommand),
    /// Consistent volume snapshots while VMs run (VSS-like: prepare,
    /// freeze, commit, thaw), the backup hook, changed-block tracking.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Hosts in maintenance: drain (move every VM away) and resume.
    #[command(subcommand)]
    Node(vm_cmd::NodeCommand),
    /// Start a whole cluster on this machine: N hosts on loopback, a LUN
    /// file as Volume1, mounted on every host; prints `ready:` when it is
    /// up; Ctrl-C stops it.
    Up(up_cmd::UpArgs),
    /// Stop the hosts `csvctl up --detach` left running.
    Down(up_cmd::DownArgs),
    /// Rehearse a failure on the live cluster, under a load of the drill's
    /// own (writers with checksum logs on this host's mount): a SAN path
    /// lost, a slow SAN, one or all cluster networks lost, the
    /// coordinator or a host crashing, the iSCSI target restarting, the
    /// volume full, a clock jump. Reports each measure (time to redirect,
    /// longest stall, failover time, writes lost, consistency check)
    /// against its objective; exit status 1 if any misses it. Faults heal
    /// by themselves after --duration. Try --dry-run first.
    Drill(drill::DrillArgs),
    /// Every VM and VHD of the cluster with its owner, host, memory (given
    /// and used), size on disk, last run, last I/O, snapshots held, expiry
    /// and monthly cost; then the signs of sprawl (VMs stopped for long,
    /// VHDs no VM uses, old snapshots, memory given and not used, expired
    /// VMs) and what acting on each would free. Exit status 2 when
    /// anything is flagged.
    Inventory {
        #[command(flatten)]
        access: cluster_cmd::Access,
        #[command(flatten)]
        policy: inventory_cmd::Policy,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that the cluster is sound before trusting it with VMs
    /// (Test-Cluster): every volume's LUN from every host (reachable,
    /// latency, persistent reservations for fencing), two cluster networks
    /// per host, clocks, /dev/kvm and /dev/fuse, memory for the failover of
    /// each host's VMs, quorum of every group, matching versions. Each
    /// WARN and FAIL says what to do. Exit status 1 if anything FAILs.
    Validate {
        #[command(flatten)]
        access: cluster_cmd::Access,
        /// Also try this LUN (iscsi:// URL or path) from every host before
        /// it becomes a volume (repeat).
        #[arg(long = "lun")]
        luns: Vec<String>,
        #[command(flatten)]
        thresholds: validate_cmd::Thresholds,
        /// Print JSON (for automation).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vhd(c) => vhd_cmd::run(c),
        Command::P2v(a) => p2v_cmd::run(a),
        Command::San(c) => san_cmd::run(c),
        Command::Cluster(c) => cluster_cmd::run_cluster(c),
        Command::Volume(c) => cluster_cmd::run_volume(c),
        Command::Vm(c) => vm_cmd::run(c),
        Command::Template(c) => template_cmd::run(c),
        Command::Node(c) => vm_cmd::run_node(c),
        Command::Snapshot(c) => snapshot_cmd::run(c),
        Command::Up(a) => up_cmd::up(a),
        Command::Down(a) => up_cmd::down(a),
        Command::Drill(a) => drill::run(a),
        Command::Inventory {
            access,
            policy,
            json,
        } => inventory_cmd::run(&access, &policy, json),
        Command::Validate {
            access,
            luns,
            thresholds,
            json,
        } => validate_cmd::run(&access, &luns, &thresholds, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}
