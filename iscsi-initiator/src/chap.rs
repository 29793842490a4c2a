//! CHAP with MD5 (RFC 1994 as used by RFC 7143 §12.1.3): the response to a
//! challenge is `MD5(identifier || secret || challenge)`; binary values
//! travel as `0x`-prefixed hex (base64 `0b` is accepted too).

use md5::{Digest, Md5};

/// CHAP algorithm number of MD5.
pub const CHAP_MD5: &str = "5";

/// The response to challenge `challenge` with identifier `id`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// `0x`-prefixed lower-case hex.
pub fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Decodes a CHAP binary value (`0x` hex or `0b` base64).
pub fn from_value(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.len() % 2 != 0 || h.len() > 2048 {
            return None;
        }
        return (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect();
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return base64(b);
    }
    None
}

fn base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    if bytes.len() > 4096 {
        return None;
    }
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// `n` random bytes for a challenge.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if ok.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn md5_response_known_value() {
        // MD5(0x01 || "secret" || 0x00 0x01 0x02).
        let r = response(1, b"secret", &[0, 1, 2]);
        let mut h = Md5::new();
        h.update([1u8, b's', b'e', b'c', b'r', b'e', b't', 0, 1, 2]);
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want);
    }

    #[test]
    fn values() {
        assert_eq!(from_value("0x0aFF").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(from_value("0bAAEC").unwrap(), vec![0x00, 0x01, 0x02]);
        assert!(from_value("0x0").is_none());
        assert!(from_value("zz").is_none());
        assert_eq!(to_hex(&[1, 0xab]), "0x01ab");
    }

    proptest! {
        #[test]
        fn hex_round_trip(b in prop::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(from_value(&to_hex(&b)).unwrap(), b);
        }

        #[test]
        fn arbitrary_values_never_panic(s in ".{0,80}") {
            let _ = from_value(&s);
        }
    }
}
