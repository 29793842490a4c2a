//! This host's SAN path to a volume on an iSCSI LUN: one session per
//! volume, logged in with this host's own initiator name (so the target,
//! its ACLs and its persistent reservations see each host apart), through
//! the project's userspace initiator.
//!
//! Fencing: every host registers its own reservation key on each volume's
//! LUN when it mounts it, and one of them holds a *Write Exclusive –
//! Registrants Only* reservation, so only registered hosts can write. The
//! session's ISID is fixed per host and volume, so a reconnection is the
//! same I_T nexus and keeps its registration. When the cluster marks a host
//! down, the host leading the cluster group preempts that host's key: its
//! writes then get RESERVATION CONFLICT until it rejoins (the registry,
//! read with quorum, says it is up again) and registers once more.

use iscsi_initiator::session::Timeouts;
use iscsi_initiator::{new_isid, BlockingLun, Chap, IscsiUrl, LoginConfig, Lun, Session};
use std::sync::Arc;
use std::time::Duration;

/// What went wrong on a SAN path.
#[derive(Debug, thiserror::Error)]
pub enum SanError {
    /// Not a usable iSCSI URL.
    #[error("{url} names no target (iscsi://portal/target-iqn/lun)")]
    NoTarget {
        /// The URL.
        url: String,
    },
    /// The initiator refused or failed (a bad URL, the login, a command).
    #[error("{what}")]
    Iscsi {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: iscsi_initiator::Error,
    },
    /// A local resource (the session's runtime, a LUN file).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The LUN holds a reservation that is not ours to share.
    #[error("the LUN holds a reservation of type {kind} by key {holder:#x}, not Write Exclusive – Registrants Only")]
    ForeignReservation {
        /// The holder's key.
        holder: u64,
        /// The reservation's type.
        kind: u8,
    },
    /// A reopened path may not register yet (see the volume's mount).
    #[error("the path answers again; registering key {key:#x} on the new session once the registry has this host up")]
    NotUpYet {
        /// The key it would register.
        key: u64,
    },
}

fn iscsi(what: impl Into<String>) -> impl FnOnce(iscsi_initiator::Error) -> SanError {
    let what = what.into();
    move |source| SanError::Iscsi { what, source }
}

/// How this host identifies itself on the SAN.
#[derive(Debug, Clone)]
pub struct SanIdentity {
    /// Its initiator name (unique per host).
    pub initiator: String,
    /// CHAP credentials, when the targets ask for them.
    pub chap: Option<Chap>,
    /// The host's node id (0: a tool, not a host: no reservation key, a
    /// random ISID).
    pub node: u64,
}

/// This incarnation's registration epoch: when the process started, in
/// seconds (24 bits), so a host that restarts registers a key of its own
/// and a key left on the LUN by an earlier incarnation is told apart from
/// the live one.
pub fn epoch() -> u64 {
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xff_ffff)
            .unwrap_or(1)
    })
}

/// Host `node`'s persistent-reservation key in this incarnation.
pub fn pr_key(node: u64) -> u64 {
    pr_key_at(node, epoch())
}

/// The reservation key of host `node` in registration epoch `epoch`:
/// "CS", the node id (24 bits) and the epoch (24 bits).
pub fn pr_key_at(node: u64, epoch: u64) -> u64 {
    0x4353 << 48 | (node & 0xff_ffff) << 24 | (epoch & 0xff_ffff)
}

/// The host a csv reservation key belongs to (None: not a csv key).
pub fn pr_key_node(key: u64) -> Option<u64> {
    (key >> 48 == 0x4353).then_some((key >> 24) & 0xff_ffff)
}

/// The ISID of host `node`'s session to volume `vol`: the same on every
/// login, so a reconnection is the same I_T nexus.
pub fn stable_isid(node: u64, vol: u64) -> [u8; 6] {
    let n = (node as u32).to_be_bytes();
    let v = (vol as u16).to_be_bytes();
    // Type 0b10 ("random") in the top bits, as new_isid makes them.
    [0x80 | (n[0] & 0x3f), n[1], n[2], n[3], v[0], v[1]]
}

/// Registers `key` on the LUN (replacing whatever this nexus had) and
/// makes sure a Write Exclusive – Registrants Only reservation is held.
pub fn pr_register(lun: &BlockingLun, key: u64) -> Result<(), SanError> {
    use iscsi_initiator::scsi::{PrOut, PR_WE_RO};
    let l = lun.lun();
    lun.block_on(l.reserve_out(PrOut::RegisterAndIgnore, 0, 0, key))
        .map_err(iscsi(format!("registering reservation key {key:#x}")))?;
    match lun
        .block_on(l.reservation())
        .map_err(iscsi("reading the reservation"))?
    {
        Some((_, kind)) if kind == PR_WE_RO => Ok(()),
        Some((holder, kind)) => Err(SanError::ForeignReservation { holder, kind }),
        None => lun
            .block_on(l.reserve_out(PrOut::Reserve, PR_WE_RO, key, 0))
            .map_err(iscsi("reserving the LUN")),
    }
}

/// A LUN's persistent reservation (holder key and type, if held) and its
/// registered keys.
pub type PrState = (Option<(u64, u8)>, Vec<u64>);

/// The LUN's persistent reservation and registered keys.
pub fn pr_state(lun: &BlockingLun) -> Result<PrState, SanError> {
    let held = lun
        .block_on(lun.lun().reservation())
        .map_err(iscsi("reading the reservation"))?;
    let keys = lun
        .block_on(lun.lun().reservation_keys())
        .map_err(iscsi("reading the registered keys"))?;
    Ok((held, keys))
}

/// Removes every registration and the reservation from the LUN (PERSISTENT
/// RESERVE OUT CLEAR, which only a registrant may send: `key` is
/// registered for it first).
pub fn pr_clear(lun: &BlockingLun, key: u64) -> Result<(), SanError> {
    use iscsi_initiator::scsi::{PrOut, PR_WE_RO};
    let l = lun.lun();
    lun.block_on(l.reserve_out(PrOut::RegisterAndIgnore, 0, 0, key))
        .map_err(iscsi(format!("registering reservation key {key:#x}")))?;
    lun.block_on(l.reserve_out(PrOut::Clear, PR_WE_RO, key, 0))
        .map_err(iscsi("clearing the reservations"))
}

/// Whether `key` is registered on the LUN.
pub fn pr_registered(lun: &BlockingLun, key: u64) -> Result<bool, SanError> {
    lun.block_on(lun.lun().reservation_keys())
        .map(|k| k.contains(&key))
        .map_err(iscsi("reading the registered keys"))
}

/// Whether `keys` (a LUN's registrations) hold a key of host `node`.
pub fn pr_holds(keys: &[u64], node: u64) -> bool {
    keys.iter().any(|k| pr_key_node(*k) == Some(node))
}

/// Removes every registration of host `node` (whatever its epoch), and
/// takes the reservation if one of them held it, as registrant `key`. The
/// keys removed (none: the host was not registered).
pub fn pr_preempt_node(lun: &BlockingLun, key: u64, node: u64) -> Result<Vec<u64>, SanError> {
    use iscsi_initiator::scsi::{PrOut, PR_WE_RO};
    let keys = lun
        .block_on(lun.lun().reservation_keys())
        .map_err(iscsi("reading the registered keys"))?;
    let mut gone = Vec::new();
    for victim in keys {
        if victim == key || pr_key_node(victim) != Some(node) || gone.contains(&victim) {
            continue;
        }
        lun.block_on(lun.lun().reserve_out(PrOut::Preempt, PR_WE_RO, key, victim))
            .map_err(iscsi(format!("preempting key {victim:#x}")))?;
        gone.push(victim);
    }
    Ok(gone)
}

impl SanIdentity {
    /// The default initiator name of host `node`.
    pub fn default_initiator(node: u64) -> String {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .collect();
        format!(
            "iqn.2026-11.io.csv:{}-node{node}",
            if host.is_empty() { "host" } else { &host }
        )
    }
}

/// An open iSCSI path: the LUN as blocking I/O, and the runtime its
/// session runs on (kept alive as long as the path).
pub struct IscsiPath {
    /// The LUN.
    pub lun: Arc<BlockingLun>,
    /// Where the session's tasks run.
    pub runtime: tokio::runtime::Runtime,
    /// What to say about it in `volume status`.
    pub describe: String,
}

impl std::fmt::Debug for IscsiPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// Logs in to the LUN of volume `vol` at `url` as `who`.
pub fn open(url: &str, who: &SanIdentity, vol: u64) -> Result<IscsiPath, SanError> {
    let u: IscsiUrl = url.parse().map_err(iscsi("reading the LUN's URL"))?;
    if u.target.is_empty() {
        return Err(SanError::NoTarget { url: u.to_string() });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("csv-iscsi")
        .enable_all()
        .build()
        .map_err(|source| SanError::Io {
            what: "starting the iSCSI runtime",
            source,
        })?;
    let chap = match (&u.user, &u.secret, &who.chap) {
        (Some(user), Some(secret), _) => Some(Chap {
            user: user.clone(),
            secret: secret.clone(),
        }),
        (_, _, c) => c.clone(),
    };
    let cfg = LoginConfig {
        initiator: who.initiator.clone(),
        target: Some(u.target.clone()),
        isid: if who.node == 0 {
            new_isid()
        } else {
            stable_isid(who.node, vol)
        },
        chap,
        mutual: None,
        offer: Default::default(),
    };
    let lun = runtime
        .block_on(async {
            // A short recovery window: when the path stays down for 0.3 s,
            // I/O fails and the filesystem redirects it through a peer
            // instead of waiting for the SAN. A silent link (nothing reset)
            // is caught by a NOP-Out after 0.1 s of quiet that gets no
            // answer in 0.3 s: a live target answers at once, however slow
            // its disk (and a false alarm only costs a reconnection, which
            // a live target accepts at once). The cut is redirected within
            // about 0.8 s.
            let t = Timeouts {
                command: Duration::from_secs(2),
                keepalive: Duration::from_millis(100),
                ping: Duration::from_millis(300),
                recovery: Duration::from_millis(300),
                login: Duration::from_millis(250),
                // Writes caught in a lost connection wait this long before
                // they go out again: tgtd may still carry out the old copy.
                settle: Duration::from_millis(500),
            };
            let s = Session::connect_paths(std::slice::from_ref(&u.portal), &cfg, t).await?;
            Lun::open(s, u.lun).await
        })
        .map_err(iscsi(format!("reaching {} as {}", u, who.initiator)))?;
    let describe = format!(
        "iSCSI: {} LUN {} as {} ({} bytes)",
        u.target,
        u.lun,
        who.initiator,
        lun.capacity()
    );
    let lun = Arc::new(BlockingLun::new(lun, runtime.handle().clone()));
    Ok(IscsiPath {
        lun,
        runtime,
        describe,
    })
}

/// What trying a LUN from this host found (for `csvctl validate`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probe {
    /// Empty when the first 4 KiB were read; else why not.
    pub error: String,
    /// The target was reached (logged in): an error is then the LUN's.
    pub reached: bool,
    /// Median time of five 4 KiB reads (microseconds).
    pub read_us: u64,
    /// Whether persistent reservations are there.
    pub pr: coordinator::proto::PrSupport,
    /// Why persistent reservations are not available.
    pub pr_error: String,
}

fn median_read_us(read: &mut dyn FnMut() -> std::io::Result<()>) -> std::io::Result<u64> {
    let mut t = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        read()?;
        t.push(start.elapsed().as_micros() as u64);
    }
    t.sort_unstable();
    Ok(t[2])
}

/// Tries the LUN `spec` (an iscsi:// URL, logged in afresh as `who`, or a
/// path): reads its first 4 KiB five times, and asks for its persistent
/// reservation keys. Never writes.
pub fn probe(spec: &str, who: &SanIdentity) -> Probe {
    if !spec.starts_with("iscsi://") {
        let mut p = Probe {
            pr: coordinator::proto::PrSupport::NotIscsi,
            reached: true,
            ..Probe::default()
        };
        match vhd::io::DirectFile::open(std::path::Path::new(spec), false) {
            Ok(f) => {
                use vhd::BlockIo;
                let mut buf = vec![0u8; 4096];
                match median_read_us(&mut || f.read_at(&mut buf, 0)) {
                    Ok(us) => p.read_us = us,
                    Err(e) => p.error = format!("reading {spec}: {e}"),
                }
            }
            Err(e) => {
                p.reached = false;
                p.error = format!("cannot open {spec}: {e}");
            }
        }
        return p;
    }
    let u: IscsiUrl = match spec.parse() {
        Ok(u) => u,
        Err(e) => {
            return Probe {
                error: format!("{spec}: {e}"),
                ..Probe::default()
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Probe {
                error: format!("cannot start an iSCSI runtime: {e}"),
                ..Probe::default()
            }
        }
    };
    let cfg = LoginConfig {
        initiator: who.initiator.clone(),
        target: Some(u.target.clone()),
        isid: new_isid(),
        chap: who.chap.clone(),
        mutual: None,
        offer: Default::default(),
    };
    runtime.block_on(async {
        let t = Timeouts {
            command: Duration::from_secs(2),
            keepalive: Duration::from_millis(500),
            ping: Duration::from_secs(1),
            recovery: Duration::from_millis(500),
            login: Duration::from_secs(2),
            settle: Duration::from_millis(500),
        };
        let s = match Session::connect_paths(std::slice::from_ref(&u.portal), &cfg, t).await {
            Ok(s) => s,
            Err(e) => {
                return Probe {
                    error: format!("cannot log in to {} at {}: {e}", u.target, u.portal),
                    ..Probe::default()
                }
            }
        };
        let mut p = Probe {
            reached: true,
            ..Probe::default()
        };
        // Persistent reservations first: a LUN that is no disk may still
        // say whether it has them. A new nexus first reports a UNIT
        // ATTENTION (power on or reset), which says nothing of the command.
        let mut answer = None;
        for _ in 0..4 {
            let r = s
                .command(
                    u.lun,
                    iscsi_initiator::scsi::pr_in(0, 1024),
                    iscsi_initiator::session::Data::In(1024),
                )
                .await;
            let attention = matches!(&r, Ok(r) if r.sense.as_ref().is_some_and(|s| s.key == 0x6));
            answer = Some(r);
            if !attention {
                break;
            }
        }
        let Some(answer) = answer else { return p };
        match answer {
            Ok(r) if r.status == iscsi_initiator::scsi::GOOD => {
                p.pr = coordinator::proto::PrSupport::Answered
            }
            Ok(r) => {
                p.pr_error = match r.sense {
                    Some(sense) => format!("PERSISTENT RESERVE IN refused: {sense}"),
                    None => format!("PERSISTENT RESERVE IN refused: status {:#x}", r.status),
                }
            }
            Err(e) => p.pr_error = format!("PERSISTENT RESERVE IN failed: {e}"),
        }
        match Lun::open(s.clone(), u.lun).await {
            Ok(l) => {
                let mut times = Vec::new();
                for _ in 0..5 {
                    let start = std::time::Instant::now();
                    if let Err(e) = l.read(0, 4096).await {
                        p.error = format!("reading LUN {}: {e}", u.lun);
                        break;
                    }
                    times.push(start.elapsed().as_micros() as u64);
                }
                times.sort_unstable();
                p.read_us = times.get(times.len() / 2).copied().unwrap_or(0);
            }
            Err(e) => p.error = format!("LUN {} of {} is not a usable disk: {e}", u.lun, u.target),
        }
        let _ = s.logout().await;
        p
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_keys_carry_node_and_epoch() {
        let k = pr_key_at(7, 0x12_3456);
        assert_eq!(k, 0x4353_0000_0712_3456);
        assert_eq!(pr_key_node(k), Some(7));
        assert_ne!(pr_key_at(7, 1), pr_key_at(7, 2));
        assert_eq!(pr_key_node(pr_key(3)), Some(3));
        assert_eq!(pr_key_node(0xA), None);
        assert!(pr_holds(&[0xA, pr_key_at(2, 9)], 2));
        assert!(!pr_holds(&[0xA, pr_key_at(2, 9)], 3));
    }
}
