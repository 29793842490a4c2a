//! `NetNs`, `Lan` and `Link`: hosts on their own networks, on one machine.
//!
//! A multi-host test gives each host a network namespace ([`NetNs`]) and
//! joins the hosts with LANs ([`Lan`]): a Linux bridge inside a namespace of
//! its own, with one veth pair per attached host. A host's end of that pair
//! is a [`Link`] the test can take down and up, which cuts exactly that
//! host's path on that network (its SAN link, or one of its cluster
//! networks) while everything else keeps working.
//!
//! ```text
//!   host1 ns            lan ns (bridge br0)          host2 ns
//!   eth0 10.77.1.1 ---- p1      br0      p2 ---- eth0 10.77.1.2
//! ```
//!
//! Addresses are private and exist only inside these namespaces; traffic
//! never leaves the machine. Namespaces are deleted on drop, which also
//! deletes their interfaces.

use crate::cmd::run_args;
use anyhow::{bail, Context, Result};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    next_if: AtomicU32,
}

impl NetNs {
    /// Creates `csvt-<pid>-<n>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{}-{}-{}", crate::PREFIX, std::process::id(), n, tag);
        run_args("ip", ["netns", "add", &name])
            .with_context(|| format!("cannot create network namespace {name}"))?;
        let ns = NetNs {
            name,
            next_if: AtomicU32::new(0),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run_args("ip", all)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace (a network
    /// namespace is per thread), for sockets opened from the test itself.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter {}", self.name))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    fn new_ifname(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.next_if.fetch_add(1, Ordering::Relaxed))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_args("ip", ["netns", "delete", &self.name]) {
            eprintln!("NetNs: {e:#}");
        }
    }
}

/// One end of a veth pair, inside a namespace: can be taken down and up.
#[derive(Debug, Clone)]
pub struct Link {
    ns: String,
    ifname: String,
    addr: String,
}

impl Link {
    /// The interface's name inside its namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The address of this end (without prefix length).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Takes the link down: no traffic crosses it until [`Link::up`].
    pub fn down(&self) -> Result<()> {
        run_args("ip", ["-n", &self.ns, "link", "set", &self.ifname, "down"]).map(drop)
    }

    /// Brings the link back up.
    pub fn up(&self) -> Result<()> {
        run_args("ip", ["-n", &self.ns, "link", "set", &self.ifname, "up"]).map(drop)
    }
}

/// Joins `a` and `b` directly with a veth pair; addresses in CIDR form
/// (`10.77.0.1/30`). Returns (a's end, b's end).
pub fn veth(a: &NetNs, a_cidr: &str, b: &NetNs, b_cidr: &str) -> Result<(Link, Link)> {
    let an = a.new_ifname("eth");
    let bn = b.new_ifname("eth");
    run_args(
        "ip",
        [
            "link",
            "add",
            &an,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &bn,
            "netns",
            b.name(),
        ],
    )
    .with_context(|| format!("cannot create veth {}:{an} <-> {}:{bn}", a.name(), b.name()))?;
    let la = configure(a, &an, Some(a_cidr))?;
    let lb = configure(b, &bn, Some(b_cidr))?;
    Ok((la, lb))
}

fn configure(ns: &NetNs, ifname: &str, cidr: Option<&str>) -> Result<Link> {
    let mut addr = String::new();
    if let Some(cidr) = cidr {
        ns.ip(&["addr", "add", cidr, "dev", ifname])?;
        addr = cidr.split('/').next().unwrap_or(cidr).to_string();
    }
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(Link {
        ns: ns.name().to_string(),
        ifname: ifname.to_string(),
        addr,
    })
}

/// A LAN: a bridge in a namespace of its own, on `10.77.<subnet>.0/24`.
#[derive(Debug)]
pub struct Lan {
    ns: NetNs,
    subnet: u8,
}

impl Lan {
    /// Creates the LAN's namespace and bridge.
    pub fn new(tag: &str, subnet: u8) -> Result<Self> {
        let ns = NetNs::new(&format!("lan{subnet}-{tag}"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan { ns, subnet })
    }

    /// The address host number `host` gets on this LAN.
    pub fn addr(&self, host: u8) -> String {
        format!("10.77.{}.{}", self.subnet, host)
    }

    /// Plugs `host` into the LAN as `10.77.<subnet>.<host_no>/24` and
    /// returns the host's end of the cable.
    pub fn attach(&self, host: &NetNs, host_no: u8) -> Result<Link> {
        if host_no == 0 || host_no == 255 {
            bail!("host number {host_no} is not a host address");
        }
        let hn = host.new_ifname("eth");
        let port = self.ns.new_ifname("p");
        run_args(
            "ip",
            [
                "link",
                "add",
                &hn,
                "netns",
                host.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                self.ns.name(),
            ],
        )
        .with_context(|| format!("cannot plug {} into {}", host.name(), self.ns.name()))?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        self.ns.ip(&["link", "set", &port, "up"])?;
        configure(host, &hn, Some(&format!("{}/24", self.addr(host_no))))
    }
}
