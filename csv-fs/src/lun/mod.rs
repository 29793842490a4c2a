//! A volume's LUN as this host reaches it: its own SAN path (an iSCSI
//! session, or a LUN file or block device), and redirection through a
//! peer when that path is not in use.
//!
//! - [`san`]: the iSCSI session to a volume's LUN, persistent
//!   reservations (fencing), and probes for `csvctl validate`;
//! - [`redirect`]: [`RedirectingLun`], the LUN the filesystem uses;
//! - [`peers`]: pooled connections to the peers that serve redirected
//!   requests.

pub mod peers;
pub mod redirect;
pub mod san;

pub use peers::{ExchangeError, PeerConns};
pub use redirect::{IoCounters, Notify, RedirectingLun, Reopen};
pub use san::{IscsiPath, SanError, SanIdentity};
