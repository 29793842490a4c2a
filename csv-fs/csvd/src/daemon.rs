//! One host, composed once from its [`Settings`]: the coordinator service
//! with this host's services plugged in, its volumes, its VMs, and its
//! console. Every part gets what it needs when it is made; nothing is set
//! on it afterwards.
//!
//! ```text
//!                  Settings
//!                     |
//!   Listeners (bound first: their addresses are everyone's endpoint)
//!        |
//!   VolumesView ----> HostAgent (block, file, redirect, fault, probe, status)
//!        |      \---> SnapshotAgent (snapshot phases)
//!        |             \-- Supervisor's view (VMs to pause)
//!   Node::start(services)   -- the Raft groups and the RPC service
//!   Volumes::run            -- mounts, fencing, states
//!   Supervisor::run         -- the VM roles of this host
//!   Console::start          -- page, JSON, metrics
//! ```

use crate::agent::{AgentConfig, CrashHook, HostAgent};
use crate::console::{Console, ConsoleConfig, ConsoleError};
use crate::settings::Settings;
use crate::snapshot::SnapshotAgent;
use crate::volumes::{Volumes, VolumesView};
use coordinator::env::DiskEnv;
use coordinator::node::{Config, Listeners, Node, NodeError};
use coordinator::service::Services;
use coordinator::wire::Identity;
use csv_fs::mount::MountConfig;
use hypervisor_shim::supervisor::{Supervisor, SupervisorConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why the host did not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Its settings.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// The coordinator service.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The console.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Blocking the signals it waits for.
    #[error("blocking SIGTERM and SIGINT")]
    Signals(#[source] nix::Error),
}

/// Starts the host and serves until SIGTERM or SIGINT, then stops its
/// VMs, unmounts its volumes and returns.
pub fn run(s: Settings) -> Result<(), DaemonError> {
    // Signals are taken by this thread only (every thread started from
    // here inherits the mask).
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block().map_err(DaemonError::Signals)?;
    let identity = s.node.identity.clone();
    let id = identity.node;
    let client = Identity {
        node: 0,
        ..identity.clone()
    };
    let listeners = Listeners::bind(&s.node.listen)?;
    let bound: Vec<SocketAddr> = listeners.addrs().to_vec();
    // This host first, then the others.
    let peers: Vec<SocketAddr> = s
        .node
        .peers
        .iter()
        .filter(|(p, _)| **p != id)
        .flat_map(|(_, a)| coordinator::node::resolve(a))
        .filter(|a| !bound.contains(a))
        .collect();
    let endpoints: Vec<SocketAddr> = bound.iter().chain(&peers).copied().collect();
    let volumes = VolumesView::default();
    let supervisor = s.mount_root.clone().map(|root| {
        Supervisor::new(SupervisorConfig {
            node: id,
            mount_root: root,
            run_dir: s.node.data_dir.join("vms"),
            engine: s.engine.engine(s.vmm.as_deref()),
            identity: client.clone(),
            endpoints: bound.clone(),
            fenced: volumes.fenced.clone(),
            disks: Arc::new(crate::volumes::VolumeDisks {
                mounted: volumes.mounted.clone(),
            }),
        })
    });
    let vm_view = supervisor.as_ref().map(Supervisor::view);
    let crash: CrashHook = {
        let v = vm_view.clone();
        Arc::new(move |down| crate::crash::crash(v.as_ref(), down))
    };
    let agent = Arc::new(HostAgent::new(AgentConfig {
        identity: identity.clone(),
        san: s.san.clone(),
        listen: bound.clone(),
        volumes: volumes.clone(),
        vms: vm_view.clone(),
        vm_memory: s.vm_memory,
        crash,
    }));
    let snapshots = Arc::new(SnapshotAgent::new(
        s.snapshot_hooks.clone(),
        volumes.mounted.clone(),
        vm_view,
    ));
    let services = Services {
        block: Some(agent.clone()),
        file: Some(agent.clone()),
        redirect: Some(agent.clone()),
        snapshot: Some(snapshots),
        fault: Some(agent.clone()),
        probe: Some(agent.clone()),
        console: Some(agent.clone()),
        status: Some(agent),
    };
    let node = Node::start(
        Config {
            identity: identity.clone(),
            data_dir: s.node.data_dir.clone(),
            peers: s.node.peers.clone(),
            init: s.node.init,
            timing: s.node.timing.clone(),
            level: s.node.level,
        },
        Arc::new(DiskEnv),
        listeners,
        services,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(addr) = s.console {
        Console::start(
            ConsoleConfig {
                addr,
                identity: identity.clone(),
                own: bound[0],
                actions: s.console_actions,
            },
            stop.clone(),
        )?;
        tracing::info!(
            "console and metrics on http://{addr}/ ({})",
            if s.console_actions {
                "actions need the operator token"
            } else {
                "read-only"
            }
        );
    }
    let vm_stop = Arc::new(AtomicBool::new(false));
    let vms = supervisor.map(|sup| {
        let stop = vm_stop.clone();
        std::thread::spawn(move || sup.run(stop))
    });
    // Scheduled snapshots: every host runs the loop, the cluster's leader
    // acts.
    let scheduler = {
        let sch = crate::schedule::Scheduler {
            node: id,
            identity: client.clone(),
            endpoints: endpoints.clone(),
        };
        let stop = stop.clone();
        std::thread::spawn(move || sch.run(stop))
    };
    let mounts = s.mount_root.clone().map(|root| {
        let cfg = MountConfig {
            node: id,
            root,
            identity: client.clone(),
            endpoints,
            threads: s.fuse_threads,
            readers: s.fuse_readers,
            atime: s.atime,
            guard: s.mount_guard,
            san: s.san.clone(),
            peers,
        };
        let v = Volumes::new(cfg, s.luns.clone(), volumes.clone());
        let stop = stop.clone();
        std::thread::spawn(move || v.run(stop))
    });
    let addrs: Vec<String> = node.bound.iter().map(|a| a.to_string()).collect();
    println!("csvd: host {id} serving on {}", addrs.join(", "));
    let sig = sigs.wait();
    tracing::info!("{sig:?}: stopping the VMs, unmounting and stopping");
    vm_stop.store(true, Ordering::Relaxed);
    if let Some(h) = vms {
        let _ = h.join();
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = mounts {
        let _ = h.join();
    }
    let _ = scheduler.join();
    Ok(())
}
