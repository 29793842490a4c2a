//! What arrives from the target in the full feature phase: every PDU is
//! matched to its task, the sequence numbers move forward, R2Ts are
//! answered with Data-Out and target NOP-Ins with NOP-Out.

use super::*;

fn update_sn(st: &mut State, exp: u32, max: u32) {
    if sn_lt(st.exp_cmd_sn, exp) {
        st.exp_cmd_sn = exp;
    }
    // MaxCmdSN only counts when it is not below ExpCmdSN - 1.
    if sn_lt(st.max_cmd_sn, max) && sn_le(exp.wrapping_sub(1), max) {
        st.max_cmd_sn = max;
    }
}

fn finish(st: &mut State, itt: u32, r: Result<Reply>) {
    if let Some(mut t) = st.tasks.remove(&itt) {
        if let Some(d) = t.done.take() {
            let _ = d.send(r);
        }
    }
}

fn protocol(portal: &str, what: String) -> Error {
    Error::Protocol {
        portal: portal.to_string(),
        what,
    }
}

pub(super) fn handle(inner: &Inner, gen: u64, p: Pdu) -> Result<()> {
    let mut st = lock(inner)?;
    if st.generation != gen {
        return Ok(());
    }
    let portal = inner.portals.get(st.portal).map_or("", String::as_str);
    st.last_rx = Instant::now();
    let opcode = p.opcode();
    if matches!(
        opcode,
        op::NOP_IN
            | op::SCSI_RESP
            | op::DATA_IN
            | op::R2T
            | op::ASYNC
            | op::REJECT
            | op::LOGOUT_RESP
            | op::TASK_MGMT_RESP
    ) {
        update_sn(&mut st, p.u32_at(28), p.u32_at(32));
    }
    let itt = p.itt();
    match opcode {
        op::DATA_IN => data_in(&mut st, portal, p)?,
        op::SCSI_RESP => scsi_response(&mut st, portal, &p)?,
        op::R2T => r2t(&mut st, portal, &p)?,
        op::NOP_IN => nop_in(&mut st, &p),
        op::ASYNC => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            let event = p.bhs[36];
            tracing::info!(portal = %portal, event, "asynchronous message from target");
            if matches!(event, 1..=3) {
                return Err(protocol(
                    portal,
                    format!("target asks to end the connection (async event {event})"),
                ));
            }
        }
        op::REJECT => reject(&mut st, portal, &p)?,
        op::LOGOUT_RESP | op::TASK_MGMT_RESP => {
            st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            finish(
                &mut st,
                itt,
                Ok(Reply {
                    status: p.bhs[2],
                    sense: None,
                    data: Vec::new(),
                    residual: 0,
                }),
            );
        }
        other => {
            return Err(protocol(
                portal,
                format!("unexpected opcode {other:#04x} in full feature phase"),
            ))
        }
    }
    pump(&mut st);
    Ok(())
}

/// Data-In: a piece of a read, with the task's status on its last one.
fn data_in(st: &mut State, portal: &str, p: Pdu) -> Result<()> {
    let itt = p.itt();
    let status_here = p.flags() & 0x01 != 0;
    let (stat_sn, status, resid) = (p.u32_at(24), p.bhs[3], residual(&p));
    let offset = p.u32_at(40) as usize;
    let Some(t) = st.tasks.get_mut(&itt) else {
        return Err(protocol(
            portal,
            format!("Data-In for unknown task {itt:#x}"),
        ));
    };
    let max = match t.data {
        Data::In(n) => n,
        _ => 0,
    };
    let end = offset
        .checked_add(p.data.len())
        .filter(|&e| e <= max)
        .ok_or_else(|| {
            protocol(
                portal,
                format!(
                    "Data-In at {offset}+{} beyond the {max} bytes expected",
                    p.data.len()
                ),
            )
        })?;
    if offset == 0 && t.read.is_empty() {
        // The usual case, one Data-In for the whole read: keep the PDU's
        // buffer.
        t.read = p.data;
    } else {
        if t.read.len() < end {
            t.read.resize(end, 0);
        }
        t.read[offset..end].copy_from_slice(&p.data);
    }
    if status_here {
        st.exp_stat_sn = stat_sn.wrapping_add(1);
        let read = st
            .tasks
            .get_mut(&itt)
            .map(|t| std::mem::take(&mut t.read))
            .unwrap_or_default();
        finish(
            st,
            itt,
            Ok(Reply {
                status,
                sense: None,
                data: read,
                residual: resid,
            }),
        );
    }
    Ok(())
}

/// SCSI Response: a task's status (and sense), after its Data-In if any.
fn scsi_response(st: &mut State, portal: &str, p: &Pdu) -> Result<()> {
    let itt = p.itt();
    st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
    let Some(t) = st.tasks.get_mut(&itt) else {
        return Err(protocol(
            portal,
            format!("SCSI Response for unknown task {itt:#x}"),
        ));
    };
    let read = std::mem::take(&mut t.read);
    if p.bhs[2] != 0 {
        let e = protocol(
            portal,
            format!("target failure response {:#04x} to task {itt:#x}", p.bhs[2]),
        );
        finish(st, itt, Err(e));
        return Ok(());
    }
    let sense = if p.data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
        p.data.get(2..2 + n).and_then(Sense::parse)
    } else {
        None
    };
    finish(
        st,
        itt,
        Ok(Reply {
            status: p.bhs[3],
            sense,
            data: read,
            residual: residual(p),
        }),
    );
    Ok(())
}

/// R2T: the target is ready for a piece of a write; send it as Data-Out.
fn r2t(st: &mut State, portal: &str, p: &Pdu) -> Result<()> {
    let itt = p.itt();
    let ttt = p.u32_at(20);
    let offset = p.u32_at(40) as usize;
    let len = p.u32_at(44) as usize;
    let Some(t) = st.tasks.get(&itt) else {
        return Err(protocol(portal, format!("R2T for unknown task {itt:#x}")));
    };
    let Data::Out(buf) = &t.data else {
        return Err(protocol(
            portal,
            format!("R2T for task {itt:#x}, which writes nothing"),
        ));
    };
    if offset.checked_add(len).is_none_or(|e| e > buf.len()) || len > st.params.max_burst as usize {
        return Err(protocol(
            portal,
            format!(
                "R2T for {len} bytes at {offset} of a {}-byte write",
                buf.len()
            ),
        ));
    }
    let mut frame = Vec::new();
    for d in data_out_pdus(
        itt,
        t.lun,
        ttt,
        st.exp_stat_sn,
        buf,
        offset,
        len,
        st.params.max_send_data as usize,
    ) {
        frame.extend_from_slice(&d.encode(st.digests));
    }
    send(st, frame);
    Ok(())
}

/// NOP-In: the answer to our ping, or the target's ping to answer.
fn nop_in(st: &mut State, p: &Pdu) {
    let itt = p.itt();
    let ttt = p.u32_at(20);
    if itt != NO_TAG {
        finish(
            st,
            itt,
            Ok(Reply {
                status: 0,
                sense: None,
                data: Vec::new(),
                residual: 0,
            }),
        );
    }
    if ttt != NO_TAG {
        // The target pings us: answer with its TTT and LUN.
        let mut r = Pdu::new(op::NOP_OUT, true);
        r.set_flags(0x80);
        r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
        r.set_itt(NO_TAG);
        r.set_u32(20, ttt);
        r.set_u32(24, st.cmd_sn);
        r.set_u32(28, st.exp_stat_sn);
        let frame = r.encode(st.digests);
        send(st, frame);
    } else {
        st.exp_stat_sn = p.u32_at(24).wrapping_add(1);
    }
}

/// Reject: the target refused a PDU; fail its task, or the connection
/// when the PDU is not a task's.
fn reject(st: &mut State, portal: &str, p: &Pdu) -> Result<()> {
    let reason = p.bhs[2];
    let rejected = if p.data.len() >= 20 {
        u32::from_be_bytes([p.data[16], p.data[17], p.data[18], p.data[19]])
    } else {
        NO_TAG
    };
    if !st.tasks.contains_key(&rejected) {
        return Err(protocol(
            portal,
            format!("target rejected a PDU (reason {reason:#04x})"),
        ));
    }
    let e = protocol(
        portal,
        format!("target rejected task {rejected:#x} (reason {reason:#04x})"),
    );
    finish(st, rejected, Err(e));
    Ok(())
}

pub(super) fn residual(p: &Pdu) -> i64 {
    let r = i64::from(p.u32_at(44));
    if p.flags() & 0x04 != 0 {
        -r
    } else if p.flags() & 0x02 != 0 {
        r
    } else {
        0
    }
}
