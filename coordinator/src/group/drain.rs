//! raft-rs logs through slog; this drain hands its lines to `tracing`.

/// A slog drain that hands raft-rs's log lines to `tracing`.
pub(super) struct TracingDrain {
    pub(super) group: u64,
}

struct KvLine(String);

impl slog::Serializer for KvLine {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut line = KvLine(String::new());
        let _ = r.kv().serialize(r, &mut line);
        let _ = kv.serialize(r, &mut line);
        let g = self.group;
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", group = g, "{}{}", r.msg(), line.0)
            }
            slog::Level::Warning => {
                tracing::warn!(target: "raft", group = g, "{}{}", r.msg(), line.0)
            }
            slog::Level::Info => tracing::info!(target: "raft", group = g, "{}{}", r.msg(), line.0),
            _ => tracing::trace!(target: "raft", group = g, "{}{}", r.msg(), line.0),
        }
        Ok(())
    }
}
