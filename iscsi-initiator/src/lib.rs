//! A userspace iSCSI initiator (RFC 7143) on tokio.
//!
//! Each host of a csv cluster reaches the SAN through this crate:
//! SendTargets discovery, login with CHAP (one-way and mutual), digests,
//! many SCSI commands in flight with immediate, unsolicited and solicited
//! (R2T) data, NOP keepalive, and the SCSI commands a cluster needs,
//! persistent reservations included. A LUN is used through [`Lun`].
//!
//! Layers, bottom up: [`pdu`] (framing, digests), [`text`] (keys and
//! negotiation), [`chap`], [`login`], [`session`] (full feature phase),
//! [`scsi`] (CDBs and what comes back), [`lun`].

pub mod blocking;
pub mod chap;
mod conn;
pub mod error;
pub mod login;
pub mod lun;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod text;
pub mod url;

pub use blocking::BlockingLun;
pub use error::{Error, Result};
pub use login::{Chap, LoginConfig};
pub use lun::Lun;
pub use session::Session;
pub use url::IscsiUrl;

/// A fresh ISID of the "random" format (type 0b10 with random bits), so
/// two initiators on one host never share one.
pub fn new_isid() -> [u8; 6] {
    let r = chap::random_bytes(6);
    let mut i = [0u8; 6];
    i.copy_from_slice(&r);
    i[0] = 0x80 | (i[0] & 0x3f);
    i
}
