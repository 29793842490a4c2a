//! `iscsi://[user[%secret]@]host[:port]/target-iqn/lun`, the URL form of
//! libiscsi. The secret is never printed: [`IscsiUrl`]'s `Display` leaves
//! it out.

use crate::error::{Error, Result};

/// Default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;

/// A parsed iSCSI URL.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// `host:port` (IPv6 in brackets).
    pub portal: String,
    /// Target IQN (empty for a portal-only URL, as discovery takes).
    pub target: String,
    /// LUN (0 when not given).
    pub lun: u16,
    /// CHAP user.
    pub user: Option<String>,
    /// CHAP secret.
    pub secret: Option<String>,
}

impl std::fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IscsiUrl({self})")
    }
}

impl std::fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "iscsi://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        write!(f, "{}", self.portal)?;
        if !self.target.is_empty() {
            write!(f, "/{}/{}", self.target, self.lun)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for IscsiUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Url {
            url: redact(s),
            reason: reason.to_string(),
        };
        let rest = s
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("it must start with iscsi://"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (user, secret) = match auth {
            Some(a) => match a.split_once('%') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
            None => (None, None),
        };
        if user.as_deref() == Some("") {
            return Err(bad("empty user name"));
        }
        let mut parts = rest.splitn(3, '/');
        let hostport = parts.next().unwrap_or("");
        if hostport.is_empty() {
            return Err(bad("no host"));
        }
        let portal = if hostport.starts_with('[') {
            match hostport.find(']') {
                Some(i) if hostport.len() == i + 1 => format!("{hostport}:{DEFAULT_PORT}"),
                Some(i) if hostport[i + 1..].starts_with(':') => {
                    hostport[i + 2..]
                        .parse::<u16>()
                        .map_err(|_| bad("bad port"))?;
                    hostport.to_string()
                }
                _ => return Err(bad("bad IPv6 address")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => {
                    p.parse::<u16>().map_err(|_| bad("bad port"))?;
                    if h.is_empty() {
                        return Err(bad("no host"));
                    }
                    hostport.to_string()
                }
                None => format!("{hostport}:{DEFAULT_PORT}"),
            }
        };
        let target = parts.next().unwrap_or("").to_string();
        let lun = match parts.next() {
            Some(l) if !l.is_empty() => l
                .parse::<u16>()
                .map_err(|_| bad("LUN is not a number below 65536"))?,
            _ => 0,
        };
        let named = ["iqn.", "eui.", "naa."]
            .iter()
            .any(|p| target.starts_with(p));
        if !target.is_empty() && !named {
            return Err(bad("target name must start with iqn., eui. or naa."));
        }
        Ok(IscsiUrl {
            portal,
            target,
            lun,
            user,
            secret,
        })
    }
}

/// The URL with any secret replaced by `***`, for messages.
pub fn redact(s: &str) -> String {
    match (s.find('%'), s.rfind('@')) {
        (Some(p), Some(a)) if p < a => format!("{}%***{}", &s[..p], &s[a..]),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_forms() {
        let u: IscsiUrl = "iscsi://alice%s3cret@10.0.0.5:3261/iqn.2026-11.io.csv:vol1/2"
            .parse()
            .unwrap();
        assert_eq!(u.portal, "10.0.0.5:3261");
        assert_eq!(u.target, "iqn.2026-11.io.csv:vol1");
        assert_eq!(u.lun, 2);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.secret.as_deref(), Some("s3cret"));
        assert!(!u.to_string().contains("s3cret"));
        let u: IscsiUrl = "iscsi://[::1]/iqn.x:y/1".parse().unwrap();
        assert_eq!(u.portal, "[::1]:3260");
        let u: IscsiUrl = "iscsi://host".parse().unwrap();
        assert_eq!((u.portal.as_str(), u.target.as_str()), ("host:3260", ""));
    }

    #[test]
    fn refuses_and_redacts() {
        for bad in [
            "http://x/iqn.a:b/1",
            "iscsi://",
            "iscsi://h:99999/iqn.a:b/1",
            "iscsi://h/notiqn/1",
            "iscsi://h/iqn.a:b/x",
        ] {
            assert!(bad.parse::<IscsiUrl>().is_err(), "{bad}");
        }
        let e = "iscsi://u%topsecret@h/bad/1"
            .parse::<IscsiUrl>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_never_panics(s in "iscsi://.{0,60}") {
            let _ = s.parse::<IscsiUrl>();
        }
    }
}
