//! `csvd`, the csv node daemon: one host of a csv cluster, composed once
//! from typed settings.
//!
//! A host runs its replicas of the cluster's Raft groups and the RPC
//! service (the `coordinator` crate), mounts every volume at
//! `<mount root>/VolumeN` (the `csv-fs` crate), runs the VM roles placed
//! on it (`hypervisor-shim`'s supervisor), and serves a web console with
//! Prometheus metrics. This crate owns how they are put together and what
//! the host serves for the others.
//!
//! - [`settings`]: the command line and the settings file, checked, as
//!   one [`settings::Settings`];
//! - [`daemon`]: the composition, and the run until SIGTERM;
//! - [`agent`]: the host's services (redirected block and file I/O,
//!   redirection, drill faults, probes, status);
//! - [`volumes`]: mounting what the registry lists, fencing by persistent
//!   reservation, how the host reaches each volume;
//! - [`snapshot`]: the host's part of a volume snapshot (hooks, VM pauses,
//!   the write freeze);
//! - [`console`]: the web console; [`metrics`]: its `/metrics`;
//! - [`crash`]: a failure drill's crash of the host.

pub mod agent;
pub mod console;
pub mod crash;
pub mod daemon;
pub mod metrics;
pub mod schedule;
pub mod settings;
pub mod snapshot;
pub mod volumes;
