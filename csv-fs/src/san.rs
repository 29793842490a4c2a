//! This host's SAN path to a volume on an iSCSI LUN: one session per
//! volume, logged in with this host's own initiator name (so the target,
//! its ACLs and its persistent reservations see each host apart), through
//! the project's userspace initiator.

use iscsi_initiator::session::Timeouts;
use iscsi_initiator::{new_isid, BlockingLun, Chap, IscsiUrl, LoginConfig, Lun, Session};
use std::sync::Arc;
use std::time::Duration;

/// How this host identifies itself on the SAN.
#[derive(Debug, Clone)]
pub struct SanIdentity {
    /// Its initiator name (unique per host).
    pub initiator: String,
    /// CHAP credentials, when the targets ask for them.
    pub chap: Option<Chap>,
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

/// Logs in to the LUN at `url` as `who`.
pub fn open(url: &str, who: &SanIdentity) -> Result<IscsiPath, String> {
    let u: IscsiUrl = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if u.target.is_empty() {
        return Err(format!(
            "{url} names no target (iscsi://portal/target-iqn/lun)"
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("csv-iscsi")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the iSCSI runtime: {e}"))?;
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
        isid: new_isid(),
        chap,
        mutual: None,
        offer: Default::default(),
    };
    let lun = runtime
        .block_on(async {
            // A short recovery window: when the path stays down for half
            // a second, I/O fails and the filesystem redirects it through
            // a peer instead of waiting for the SAN.
            let t = Timeouts {
                command: Duration::from_secs(5),
                keepalive: Duration::from_secs(2),
                recovery: Duration::from_millis(500),
                login: Duration::from_millis(300),
            };
            let s = Session::connect_paths(std::slice::from_ref(&u.portal), &cfg, t).await?;
            Lun::open(s, u.lun).await
        })
        .map_err(|e| format!("cannot reach {} as {}: {e}", u, who.initiator))?;
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
