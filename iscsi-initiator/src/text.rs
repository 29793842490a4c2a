//! Text keys (RFC 7143 §6): `key=value` pairs, each ended by a NUL, in the
//! data segment of Login and Text PDUs; and the operational parameters
//! they negotiate.

/// Longest key or value accepted (the RFC's limit for values is 255 bytes
/// for most keys; SendTargets answers and CHAP challenges are longer).
pub const MAX_VALUE: usize = 8192;
/// Most pairs accepted in one exchange.
pub const MAX_PAIRS: usize = 4096;

/// Why a text segment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// A pair without `=`.
    #[error("text pair without `=`: {0:?}")]
    NoEquals(String),
    /// A key or value that is not UTF-8 or too long.
    #[error("bad text key or value: {0}")]
    Bad(String),
    /// Too many pairs.
    #[error("more than {MAX_PAIRS} text pairs")]
    TooMany,
}

/// Parses `key=value\0...` into pairs, in order. A missing final NUL is
/// tolerated; empty entries (double NULs, padding) are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        if out.len() >= MAX_PAIRS {
            return Err(TextError::TooMany);
        }
        let s = std::str::from_utf8(raw)
            .map_err(|_| TextError::Bad(String::from_utf8_lossy(raw).into_owned()))?;
        let Some((k, v)) = s.split_once('=') else {
            return Err(TextError::NoEquals(s.chars().take(64).collect()));
        };
        if k.is_empty() || k.len() > 63 || v.len() > MAX_VALUE {
            return Err(TextError::Bad(s.chars().take(64).collect()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The value of `key` in `pairs` (the last one if repeated).
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Operational parameters of a session, as negotiated at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// Largest data segment the target accepts from us.
    pub max_send_data: u32,
    /// Largest data segment we accept (what we declared).
    pub max_recv_data: u32,
    /// Unsolicited data allowed per command (immediate + Data-Out).
    pub first_burst: u32,
    /// Largest solicited sequence (per R2T).
    pub max_burst: u32,
    /// Immediate data in the command PDU.
    pub immediate_data: bool,
    /// An R2T is needed before any Data-Out.
    pub initial_r2t: bool,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
}

impl Default for Params {
    /// The RFC's defaults (before negotiation).
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_send_data: 8192,
            max_recv_data: 8192,
            first_burst: 65536,
            max_burst: 262_144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// What we offer at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Offer header digests (CRC32C preferred, None accepted).
    pub header_digest: bool,
    /// Offer data digests.
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data: u32,
    /// FirstBurstLength we ask for.
    pub first_burst: u32,
    /// MaxBurstLength we ask for.
    pub max_burst: u32,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            header_digest: false,
            data_digest: false,
            max_recv_data: 262_144,
            first_burst: 262_144,
            max_burst: 1 << 20,
        }
    }
}

impl Offer {
    /// The operational keys of a normal session.
    pub fn keys(&self) -> Vec<(&'static str, String)> {
        let dig = |on: bool| if on { "CRC32C,None" } else { "None" }.to_string();
        vec![
            ("HeaderDigest", dig(self.header_digest)),
            ("DataDigest", dig(self.data_digest)),
            ("MaxRecvDataSegmentLength", self.max_recv_data.to_string()),
            ("InitialR2T", "No".into()),
            ("ImmediateData", "Yes".into()),
            ("FirstBurstLength", self.first_burst.to_string()),
            ("MaxBurstLength", self.max_burst.to_string()),
            ("MaxConnections", "1".into()),
            ("MaxOutstandingR2T", "1".into()),
            ("DataPDUInOrder", "Yes".into()),
            ("DataSequenceInOrder", "Yes".into()),
            ("DefaultTime2Wait", "0".into()),
            ("DefaultTime2Retain", "0".into()),
            ("ErrorRecoveryLevel", "0".into()),
        ]
    }

    /// Applies the target's answers to our offer. Keys the target did not
    /// answer keep the RFC's defaults; MaxRecvDataSegmentLength from the
    /// target is what we may send.
    pub fn resolve(&self, answers: &[(String, String)]) -> Params {
        let mut p = Params {
            max_recv_data: self.max_recv_data,
            ..Params::default()
        };
        let num = |k: &str| get(answers, k).and_then(|v| v.parse::<u32>().ok());
        p.header_digest = get(answers, "HeaderDigest") == Some("CRC32C");
        p.data_digest = get(answers, "DataDigest") == Some("CRC32C");
        if let Some(v) = num("MaxRecvDataSegmentLength") {
            p.max_send_data = v.clamp(512, 16_777_215);
        }
        // Numerical minimum keys: the result is the smaller of both sides.
        p.first_burst = num("FirstBurstLength")
            .unwrap_or(p.first_burst)
            .min(self.first_burst);
        p.max_burst = num("MaxBurstLength")
            .unwrap_or(p.max_burst)
            .min(self.max_burst);
        p.first_burst = p.first_burst.min(p.max_burst).max(512);
        p.max_burst = p.max_burst.max(512);
        // Boolean OR for InitialR2T, AND for ImmediateData.
        p.initial_r2t = get(answers, "InitialR2T") != Some("No");
        p.immediate_data = get(answers, "ImmediateData") != Some("No");
        p.max_outstanding_r2t = num("MaxOutstandingR2T").unwrap_or(1).max(1);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_encodes() {
        let pairs = parse(b"TargetName=iqn.x:y\0TargetAddress=1.2.3.4:3260,1\0\0\0").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(get(&pairs, "TargetAddress"), Some("1.2.3.4:3260,1"));
        assert_eq!(encode(&[("A", "b".into())]), b"A=b\0");
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals(_))));
        assert!(parse(b"=x\0").is_err());
    }

    #[test]
    fn negotiation_takes_minimums_and_target_limits() {
        let offer = Offer {
            header_digest: true,
            ..Offer::default()
        };
        let answers = parse(b"HeaderDigest=CRC32C\0DataDigest=None\0MaxRecvDataSegmentLength=8192\0FirstBurstLength=65536\0MaxBurstLength=262144\0InitialR2T=Yes\0ImmediateData=Yes\0").unwrap();
        let p = offer.resolve(&answers);
        assert!(p.header_digest && !p.data_digest);
        assert_eq!(p.max_send_data, 8192);
        assert_eq!(p.first_burst, 65536);
        assert_eq!(p.max_burst, 262_144);
        assert!(p.initial_r2t && p.immediate_data);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(b in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&b);
        }

        #[test]
        fn round_trip(pairs in prop::collection::vec(("[A-Za-z][A-Za-z0-9]{0,20}", "[ -~&&[^=]]{0,40}"), 0..20)) {
            let owned: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let back = parse(&encode(&owned)).unwrap();
            let want: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(back, want);
        }
    }
}
