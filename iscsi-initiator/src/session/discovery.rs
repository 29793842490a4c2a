//! SendTargets discovery on a discovery session.

use super::connect_login;
use crate::conn::{read_pdu, write_all};
use crate::error::{Error, Result};
use crate::login::{self, LoginConfig};
use crate::pdu::{op, Digests, Pdu, NO_TAG};
use std::time::Duration;

/// SendTargets discovery: the targets (name, portals) a portal offers.
pub async fn discover(
    portal: &str,
    initiator: &str,
    chap: Option<login::Chap>,
) -> Result<Vec<(String, Vec<String>)>> {
    let cfg = LoginConfig {
        initiator: initiator.into(),
        target: None,
        isid: crate::new_isid(),
        chap,
        mutual: None,
        offer: Default::default(),
    };
    let (mut stream, portal, l) = connect_login(portal, &cfg, Duration::from_secs(10)).await?;
    let portal = portal.as_str();
    let mut req = Pdu::new(op::TEXT, true);
    req.set_flags(0x80);
    req.set_itt(1);
    req.set_u32(20, NO_TAG);
    req.set_u32(24, l.cmd_sn);
    req.set_u32(28, l.exp_stat_sn);
    req.data = crate::text::encode(&[("SendTargets", "All".into())]);
    write_all(&mut stream, &req.encode(Digests::default()), portal).await?;
    let mut text = Vec::new();
    loop {
        let r = read_pdu(&mut stream, Digests::default(), 1 << 20, portal).await?;
        if r.opcode() != op::TEXT_RESP {
            return Err(Error::Protocol {
                portal: portal.into(),
                what: format!("opcode {:#04x} answering SendTargets", r.opcode()),
            });
        }
        text.extend_from_slice(&r.data);
        if r.flags() & 0x40 == 0 {
            break;
        }
        // Continue: ask for the rest with the target's TTT.
        let mut more = Pdu::new(op::TEXT, true);
        more.set_flags(0x80);
        more.set_itt(1);
        more.set_u32(20, r.u32_at(20));
        more.set_u32(24, l.cmd_sn);
        more.set_u32(28, r.u32_at(24).wrapping_add(1));
        write_all(&mut stream, &more.encode(Digests::default()), portal).await?;
    }
    let pairs = crate::text::parse(&text).map_err(|source| Error::Text {
        portal: portal.into(),
        source,
    })?;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => out.push((v, Vec::new())),
            "TargetAddress" => {
                if let Some(last) = out.last_mut() {
                    last.1
                        .push(v.split(',').next().unwrap_or_default().to_string());
                }
            }
            _ => {}
        }
    }
    Ok(out)
}
