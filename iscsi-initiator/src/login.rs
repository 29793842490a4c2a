//! Login (RFC 7143 §6.3): from a fresh TCP connection through the
//! security stage (CHAP or none) and the operational stage to the full
//! feature phase, or a SendTargets discovery session.
//!
//! ```text
//!  initiator                                  target
//!  Login(CSG=0,NSG=1) AuthMethod=CHAP,None -->
//!                                     <-- AuthMethod=CHAP
//!  CHAP_A=5                               -->
//!                                     <-- CHAP_A=5 CHAP_I CHAP_C
//!  CHAP_N CHAP_R [CHAP_I CHAP_C] (T=1)    -->
//!                                     <-- [CHAP_N CHAP_R] (T=1, NSG=1)
//!  Login(CSG=1,NSG=3,T=1) operational keys -->
//!                                     <-- answers (T=1, NSG=3): full feature
//! ```
//!
//! A status class 1 answer redirects to another portal (`TargetAddress`);
//! classes 2 and 3 are failures with a message naming the cause.

use crate::chap;
use crate::conn::{read_pdu, write_all};
use crate::error::{Error, Result};
use crate::pdu::{op, Digests, Pdu};
use crate::text::{self, Offer, Params};
use tokio::net::TcpStream;

/// CHAP credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// CHAP name.
    pub user: String,
    /// CHAP secret (never logged or printed).
    pub secret: String,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chap({}, ***)", self.user)
    }
}

/// What a login needs.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Our initiator name (IQN).
    pub initiator: String,
    /// The target to log in to; `None` for a discovery session.
    pub target: Option<String>,
    /// Session id of this initiator (the same ISID reinstates a session).
    pub isid: [u8; 6],
    /// One-way CHAP: how we authenticate to the target.
    pub chap: Option<Chap>,
    /// Mutual CHAP: how the target must authenticate to us.
    pub mutual: Option<Chap>,
    /// Operational keys we offer.
    pub offer: Offer,
}

/// A finished login.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Negotiated parameters.
    pub params: Params,
    /// Target session identifying handle.
    pub tsih: u16,
    /// Next CmdSN to use.
    pub cmd_sn: u32,
    /// ExpStatSN to send.
    pub exp_stat_sn: u32,
    /// MaxCmdSN the target allows.
    pub max_cmd_sn: u32,
}

/// Result of a login attempt.
#[derive(Debug)]
pub enum Outcome {
    /// In the full feature phase.
    Done(Logged),
    /// The target sent us to another portal (host:port).
    Redirect(String),
}

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL: u8 = 3;

fn stage_name(s: u8) -> &'static str {
    match s {
        STAGE_SECURITY => "security",
        STAGE_OPERATIONAL => "operational",
        _ => "full-feature",
    }
}

fn status_message(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (2, 0x01) => "authentication failed",
        (2, 0x02) => "authorization failure: this initiator may not access the target",
        (2, 0x03) => "target not found",
        (2, 0x04) => "target removed",
        (2, 0x05) => "unsupported version",
        (2, 0x06) => "too many connections",
        (2, 0x07) => "missing parameter",
        (2, 0x08) => "cannot include in session",
        (2, 0x09) => "session type not supported",
        (2, 0x0a) => "session does not exist",
        (2, 0x0b) => "invalid request during login",
        (2, _) => "initiator error",
        (3, 0x01) => "target error",
        (3, 0x02) => "service unavailable",
        (3, 0x03) => "out of resources",
        _ => "unknown status",
    }
}

struct Exchange<'a> {
    stream: &'a mut TcpStream,
    portal: &'a str,
    target: &'a str,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
}

impl Exchange<'_> {
    /// Sends one Login Request and returns the target's keys, whether it
    /// transits (T) and to which stage.
    async fn step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(&str, String)],
    ) -> Result<Step> {
        let mut p = Pdu::new(op::LOGIN, true);
        p.set_flags(if transit { 0x80 } else { 0 } | (csg << 2) | if transit { nsg } else { 0 });
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.bhs[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        p.set_itt(self.itt);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.data = text::encode(keys);
        write_all(self.stream, &p.encode(Digests::default()), self.portal).await?;
        let mut answers = Vec::new();
        loop {
            let r = read_pdu(self.stream, Digests::default(), 1 << 20, self.portal).await?;
            if r.opcode() != op::LOGIN_RESP {
                return Err(Error::Protocol {
                    portal: self.portal.into(),
                    what: format!("opcode {:#04x} during login", r.opcode()),
                });
            }
            let (class, detail) = (r.bhs[36], r.bhs[37]);
            self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
            self.max_cmd_sn = r.u32_at(32);
            let pairs = text::parse(&r.data).map_err(|source| Error::Text {
                portal: self.portal.into(),
                source,
            })?;
            if class == 1 {
                let addr = text::get(&pairs, "TargetAddress").unwrap_or_default();
                let hostport = addr.split(',').next().unwrap_or_default().to_string();
                return Ok(Step::Redirect(hostport));
            }
            if class != 0 {
                return Err(Error::Login {
                    target: self.target.into(),
                    portal: self.portal.into(),
                    stage: stage_name(csg),
                    class,
                    detail,
                    message: status_message(class, detail),
                });
            }
            answers.extend(pairs);
            self.tsih = u16::from_be_bytes([r.bhs[14], r.bhs[15]]);
            // C bit: more text follows; ask for it with an empty request.
            if r.flags() & 0x40 != 0 {
                let mut more = Pdu::new(op::LOGIN, true);
                more.set_flags(csg << 2);
                more.bhs[8..14].copy_from_slice(&self.isid);
                more.bhs[14..16].copy_from_slice(&self.tsih.to_be_bytes());
                more.set_itt(self.itt);
                more.set_u32(24, self.cmd_sn);
                more.set_u32(28, self.exp_stat_sn);
                write_all(self.stream, &more.encode(Digests::default()), self.portal).await?;
                continue;
            }
            let t = r.flags() & 0x80 != 0;
            let next = r.flags() & 0x03;
            return Ok(Step::Answer {
                pairs: answers,
                transit: t,
                next,
            });
        }
    }
}

enum Step {
    Answer {
        pairs: Vec<(String, String)>,
        transit: bool,
        next: u8,
    },
    Redirect(String),
}

/// Logs in on `stream` (connected to `portal`).
pub async fn login(
    stream: &mut TcpStream,
    portal: &str,
    cfg: &LoginConfig,
    tsih: u16,
) -> Result<Outcome> {
    let target = cfg.target.clone().unwrap_or_else(|| "discovery".into());
    let mut x = Exchange {
        stream,
        portal,
        target: &target,
        isid: cfg.isid,
        tsih,
        itt: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        max_cmd_sn: 1,
    };
    let mut base: Vec<(&str, String)> = vec![("InitiatorName", cfg.initiator.clone())];
    match &cfg.target {
        Some(t) => {
            base.push(("SessionType", "Normal".into()));
            base.push(("TargetName", t.clone()));
        }
        None => base.push(("SessionType", "Discovery".into())),
    }
    // Security stage.
    let mut keys = base.clone();
    keys.push((
        "AuthMethod",
        if cfg.chap.is_some() {
            "CHAP,None"
        } else {
            "None"
        }
        .into(),
    ));
    let first = match x
        .step(STAGE_SECURITY, STAGE_OPERATIONAL, cfg.chap.is_none(), &keys)
        .await?
    {
        Step::Redirect(to) => return Ok(Outcome::Redirect(to)),
        Step::Answer {
            pairs,
            transit,
            next,
        } => (pairs, transit, next),
    };
    let method = text::get(&first.0, "AuthMethod")
        .unwrap_or("None")
        .to_string();
    let mut at_stage = STAGE_SECURITY;
    let mut transited = first.1;
    if method == "CHAP" {
        let Some(c) = &cfg.chap else {
            return Err(Error::Auth {
                target: target.clone(),
                portal: portal.into(),
                reason: "the target requires CHAP; no credentials are configured".into(),
            });
        };
        transited = chap_exchange(&mut x, c, cfg.mutual.as_ref()).await?;
    } else if cfg.chap.is_some() && method != "None" {
        return Err(Error::Auth {
            target: target.clone(),
            portal: portal.into(),
            reason: format!("the target offers AuthMethod={method}, not CHAP"),
        });
    } else if !first.1 {
        // Target did not transit yet: ask again with T set.
        if let Step::Answer { transit, .. } =
            x.step(STAGE_SECURITY, STAGE_OPERATIONAL, true, &[]).await?
        {
            transited = transit;
        }
    }
    if transited {
        at_stage = STAGE_OPERATIONAL;
    }
    if at_stage != STAGE_OPERATIONAL {
        return Err(Error::Protocol {
            portal: portal.into(),
            what: "target did not leave the security stage".into(),
        });
    }
    // Operational stage.
    let mut keys: Vec<(&str, String)> = Vec::new();
    if cfg.target.is_some() {
        keys.extend(cfg.offer.keys());
    } else {
        keys.push(("HeaderDigest", "None".into()));
        keys.push(("DataDigest", "None".into()));
        keys.push((
            "MaxRecvDataSegmentLength",
            cfg.offer.max_recv_data.to_string(),
        ));
    }
    let mut answers = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        match x.step(STAGE_OPERATIONAL, STAGE_FULL, true, &keys).await? {
            Step::Redirect(to) => return Ok(Outcome::Redirect(to)),
            Step::Answer {
                pairs,
                transit,
                next,
            } => {
                answers.extend(pairs);
                if transit && next == STAGE_FULL {
                    break;
                }
            }
        }
        if rounds > 8 {
            return Err(Error::Protocol {
                portal: portal.into(),
                what: "operational negotiation did not finish in 8 rounds".into(),
            });
        }
        keys.clear();
    }
    let params = cfg.offer.resolve(&answers);
    Ok(Outcome::Done(Logged {
        params,
        tsih: x.tsih,
        cmd_sn: x.cmd_sn,
        exp_stat_sn: x.exp_stat_sn,
        max_cmd_sn: x.max_cmd_sn,
    }))
}

/// The CHAP exchange after the target chose CHAP. Returns whether the
/// target transited to the operational stage.
async fn chap_exchange(x: &mut Exchange<'_>, c: &Chap, mutual: Option<&Chap>) -> Result<bool> {
    let (target, portal) = (x.target.to_string(), x.portal.to_string());
    let auth_err = |reason: String| Error::Auth {
        target: target.clone(),
        portal: portal.clone(),
        reason,
    };
    let Step::Answer { pairs, .. } = x
        .step(
            STAGE_SECURITY,
            STAGE_OPERATIONAL,
            false,
            &[("CHAP_A", chap::CHAP_MD5.into())],
        )
        .await?
    else {
        return Err(auth_err("redirected in the middle of CHAP".into()));
    };
    if text::get(&pairs, "CHAP_A") != Some(chap::CHAP_MD5) {
        return Err(auth_err("the target does not use CHAP with MD5".into()));
    }
    let id: u8 = text::get(&pairs, "CHAP_I")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| auth_err("no valid CHAP_I from the target".into()))?;
    let challenge = text::get(&pairs, "CHAP_C")
        .and_then(chap::from_value)
        .ok_or_else(|| auth_err("no valid CHAP_C from the target".into()))?;
    let resp = chap::response(id, c.secret.as_bytes(), &challenge);
    let mut keys: Vec<(&str, String)> =
        vec![("CHAP_N", c.user.clone()), ("CHAP_R", chap::to_hex(&resp))];
    let mut ours = None;
    if mutual.is_some() {
        let my_id = chap::random_bytes(1)[0];
        let mut my_challenge = chap::random_bytes(16);
        // Never hand back the challenge we were given (reflection attack).
        if my_challenge == challenge {
            my_challenge[0] ^= 0xff;
        }
        keys.push(("CHAP_I", my_id.to_string()));
        keys.push(("CHAP_C", chap::to_hex(&my_challenge)));
        ours = Some((my_id, my_challenge));
    }
    let Step::Answer { pairs, transit, .. } = x
        .step(STAGE_SECURITY, STAGE_OPERATIONAL, true, &keys)
        .await?
    else {
        return Err(auth_err("redirected in the middle of CHAP".into()));
    };
    if let (Some(m), Some((my_id, my_challenge))) = (mutual, ours) {
        let name = text::get(&pairs, "CHAP_N")
            .ok_or_else(|| auth_err("mutual CHAP: the target sent no CHAP_N".into()))?;
        let r = text::get(&pairs, "CHAP_R")
            .and_then(chap::from_value)
            .ok_or_else(|| auth_err("mutual CHAP: the target sent no valid CHAP_R".into()))?;
        if name != m.user {
            return Err(auth_err(format!(
                "mutual CHAP: the target calls itself `{name}`, expected `{}`",
                m.user
            )));
        }
        if r.as_slice() != chap::response(my_id, m.secret.as_bytes(), &my_challenge).as_slice() {
            return Err(auth_err(
                "mutual CHAP: the target's answer is wrong (wrong secret, or an impostor)".into(),
            ));
        }
        if m.secret == c.secret {
            return Err(auth_err(
                "mutual CHAP: the two secrets are the same, which the RFC forbids".into(),
            ));
        }
    }
    Ok(transit)
}
