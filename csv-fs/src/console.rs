//! The web console and metrics endpoint `csvd --console ADDR` serves.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the console: hosts, volumes, VMs, migrations, events; live |
//! | `GET /api/state` | the same as JSON (what the page polls every second) |
//! | `GET /metrics` | Prometheus text format (see docs/OPERATIONS.md) |
//! | `POST /api/vms/NAME/migrate?to=N[&quick=1]` | an action (below) |
//!
//! On a loopback address (`csvctl up`, or behind a reverse proxy) reading
//! is open. On any other address every request needs the operator token,
//! `csvctl cluster console-token` (derived from the cluster key): the
//! header `Authorization: Bearer TOKEN` (a Prometheus scraper's
//! `authorization.credentials`), or `?token=TOKEN` on the page's address
//! (the page passes it on to what it polls); a wrong or missing one gets
//! 401. Actions are off unless csvd runs with `--console-actions`, and
//! then always need the header.
//!
//! A thread gathers the cluster's state once a second (the registry, and
//! each host's own status); the differences between two rounds are the
//! recent events the page lists (hosts up and down, volumes switching
//! between direct and redirected I/O, coordinators moving, VMs starting,
//! stopping and moving).

use coordinator::client::{self, Client};
use coordinator::proto;
use coordinator::vmrole::VmConfig;
use coordinator::wire::Identity;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Events kept for the page.
const EVENTS: usize = 200;
/// Largest request head and body read.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 4 << 10;

use coordinator::group::now_ms;
use coordinator::wire::ct_eq;

/// The operator token for console actions: HMAC of a fixed label under
/// the cluster key, as hex.
pub fn action_token(me: &Identity) -> String {
    coordinator::wire::hex(&me.key.join_secret(&me.cluster, b"csv-console-actions", 0))
}

#[derive(Default)]
struct Shared {
    state: Value,
    statuses: Vec<proto::NodeStatus>,
    info: proto::ClusterInfo,
    events: VecDeque<Value>,
}

/// The console of one host.
pub struct Console {
    me: Identity,
    own: SocketAddr,
    actions: bool,
    token: String,
    /// Bound to a loopback address: reading needs no token.
    open_reads: bool,
    shared: Mutex<Shared>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("own", &self.own)
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Serves on `addr`, gathering through this host (`own`).
    pub fn start(
        addr: SocketAddr,
        me: Identity,
        own: SocketAddr,
        actions: bool,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Arc<Console>> {
        let l = TcpListener::bind(addr)?;
        let c = Arc::new(Console {
            token: action_token(&me),
            open_reads: addr.ip().is_loopback(),
            me: Identity { node: 0, ..me },
            own,
            actions,
            shared: Mutex::default(),
        });
        let g = c.clone();
        std::thread::Builder::new()
            .name("csv-console".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    g.gather();
                    std::thread::sleep(Duration::from_secs(1));
                }
            })?;
        let s = c.clone();
        std::thread::Builder::new()
            .name("csv-http".into())
            .spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    let _ = std::thread::Builder::new()
                        .name("csv-http-conn".into())
                        .spawn(move || s.serve(conn));
                }
            })?;
        Ok(c)
    }

    /// One round: the registry and every host's status.
    fn gather(&self) {
        let mut cl = Client::new(self.me.clone(), vec![self.own]);
        cl.timeout = Duration::from_secs(2);
        let info = match cl.cluster_info() {
            Ok(i) => i,
            Err(e) => {
                self.event(
                    "cluster",
                    format!("registry unavailable: {}", client::describe(&e)),
                );
                return;
            }
        };
        let mut statuses = Vec::new();
        for n in &info.nodes {
            let st =
                n.addrs.iter().filter_map(|a| a.parse().ok()).find_map(|a| {
                    client::node_status(&self.me, a, Duration::from_millis(700)).ok()
                });
            statuses.extend(st);
        }
        let state = build_state(&self.me.cluster, &info, &statuses);
        let mut sh = match self.shared.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let changes = if sh.state.is_null() {
            vec![]
        } else {
            diff(&sh.state, &state)
        };
        for (what, text) in changes {
            push_event(&mut sh.events, &what, text);
        }
        sh.state = state;
        sh.statuses = statuses;
        sh.info = info;
    }

    fn event(&self, what: &str, text: String) {
        if let Ok(mut sh) = self.shared.lock() {
            push_event(&mut sh.events, what, text);
        }
    }

    fn state_json(&self) -> Value {
        let sh = match self.shared.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let mut s = sh.state.clone();
        if let Some(o) = s.as_object_mut() {
            o.insert(
                "events".into(),
                Value::Array(sh.events.iter().rev().cloned().collect()),
            );
            o.insert("actions".into(), Value::Bool(self.actions));
        }
        s
    }

    fn metrics(&self) -> String {
        let sh = match self.shared.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        // This host's own status, fresh.
        let own = client::node_status(&self.me, self.own, Duration::from_secs(2)).ok();
        metrics_text(own.as_ref(), &sh.info, &sh.statuses)
    }

    fn serve(&self, mut s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let (status, ctype, body) = match read_request(&mut s) {
            Ok(r) => self.route(&r),
            Err(e) => (400, "text/plain", format!("{e}\n")),
        };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Error",
        };
        let _ = write!(
            s,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn route(&self, r: &HttpRequest) -> (u16, &'static str, String) {
        let (path, query) = r.target.split_once('?').unwrap_or((&r.target, ""));
        if r.method == "GET" && !self.open_reads && !self.token_given(r, query) {
            return (
                401,
                "text/plain",
                "this console needs the operator token: `Authorization: Bearer TOKEN` or ?token=TOKEN (csvctl cluster console-token)\n"
                    .into(),
            );
        }
        match (r.method.as_str(), path) {
            ("GET", "/") | ("GET", "/index.html") => {
                (200, "text/html; charset=utf-8", PAGE.to_string())
            }
            ("GET", "/api/state") => (200, "application/json", self.state_json().to_string()),
            ("GET", "/metrics") => (200, "text/plain; version=0.0.4", self.metrics()),
            ("POST", p) if p.starts_with("/api/") => self.action(r, p, query),
            (_, "/") | (_, "/api/state") | (_, "/metrics") => {
                (405, "text/plain", "method not allowed\n".into())
            }
            _ => (404, "text/plain", "not found\n".into()),
        }
    }

    /// The request carries the operator token (header, or `token=` in the
    /// query).
    fn token_given(&self, r: &HttpRequest, query: &str) -> bool {
        let header = r
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.strip_prefix("Bearer "));
        let param = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v);
        [header, param]
            .into_iter()
            .flatten()
            .any(|t| ct_eq(t.trim().as_bytes(), self.token.as_bytes()))
    }

    fn action(&self, r: &HttpRequest, path: &str, query: &str) -> (u16, &'static str, String) {
        if !self.actions {
            return (
                403,
                "text/plain",
                "this console is read-only (csvd runs without --console-actions)\n".into(),
            );
        }
        let given = r
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !ct_eq(given.trim().as_bytes(), self.token.as_bytes()) {
            return (
                401,
                "text/plain",
                "an action needs `Authorization: Bearer TOKEN` (csvctl cluster console-token)\n"
                    .into(),
            );
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let arg = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        };
        match parts.as_slice() {
            ["api", "vms", name, "migrate"] => {
                let Some(to) = arg("to").and_then(|t| t.parse::<u64>().ok()) else {
                    return (400, "text/plain", "migrate needs ?to=HOST\n".into());
                };
                match self.migrate(name, to, arg("quick").is_some_and(|q| q == "1")) {
                    Ok(()) => {
                        self.event(
                            "vm",
                            format!("{name}: migration to host {to} asked from the console"),
                        );
                        (200, "application/json", json!({"ok": true}).to_string())
                    }
                    Err(e) => (
                        400,
                        "application/json",
                        json!({"ok": false, "error": e}).to_string(),
                    ),
                }
            }
            _ => (404, "text/plain", "no such action\n".into()),
        }
    }

    fn migrate(&self, name: &str, to: u64, quick: bool) -> Result<(), String> {
        let mut cl = Client::new(self.me.clone(), vec![self.own]);
        let info = cl.cluster_info().map_err(|e| client::describe(&e))?;
        let role = info
            .vms
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| format!("no VM role {name:?}"))?;
        let mut cfg = VmConfig::from_role(role)?;
        if cfg.state != "running" || role.node == 0 {
            return Err(format!("{name} is not running"));
        }
        if role.node == to {
            return Err(format!("{name} runs on host {to} already"));
        }
        if !info.nodes.iter().any(|n| n.id == to) {
            return Err(format!("no host {to}"));
        }
        cfg.migrate_to = Some(to);
        cfg.migrate_quick = quick;
        cl.set_vm_role(proto::VmRole {
            name: role.name.clone(),
            node: role.node,
            config: cfg.to_bytes(),
        })
        .map_err(|e| client::describe(&e))
    }
}

fn push_event(events: &mut VecDeque<Value>, what: &str, text: String) {
    events.push_back(json!({"at": now_ms(), "kind": what, "text": text}));
    while events.len() > EVENTS {
        events.pop_front();
    }
}

/// A parsed request.
#[derive(Debug, PartialEq)]
pub struct HttpRequest {
    /// GET, POST...
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// Reads one request head (and skips a small body); refuses what is too
/// big or malformed.
pub fn read_request(s: &mut impl Read) -> Result<HttpRequest, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the request ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let req = parse_head(&buf[..end])?;
    let len: usize = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.trim()
                .parse()
                .map_err(|_| "bad Content-Length".to_string())
        })
        .transpose()?
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err("request body too large".into());
    }
    Ok(req)
}

/// Parses a request head (without the blank line).
pub fn parse_head(head: &[u8]) -> Result<HttpRequest, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut it = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(format!("bad request line {first:?}"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Err(format!("bad request line {first:?}"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header line {l:?}"))?;
        if headers.len() >= 64 {
            return Err("too many headers".into());
        }
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(HttpRequest {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

/// The console's JSON from the registry and the hosts' statuses.
pub fn build_state(
    cluster: &str,
    info: &proto::ClusterInfo,
    statuses: &[proto::NodeStatus],
) -> Value {
    let status_of = |id: u64| statuses.iter().find(|s| s.node == id);
    let placed = |id: u64| -> Vec<VmConfig> {
        info.vms
            .iter()
            .filter(|r| r.node == id)
            .filter_map(|r| VmConfig::from_role(r).ok())
            .filter(|c| c.state == "running")
            .collect()
    };
    // Ratings for a typical VM (1 vCPU, 1 GiB), as placement would give.
    let loads: Vec<coordinator::placement::HostLoad> = info
        .nodes
        .iter()
        .map(|n| {
            let st = status_of(n.id);
            let load = st.and_then(|s| s.load.clone()).unwrap_or_default();
            let vms = placed(n.id);
            let (mut mem_total, mut mem_available) = (load.mem_total, load.mem_available);
            if load.vm_memory > 0 {
                let committed: u64 = vms.iter().map(|c| c.memory).sum();
                mem_total = mem_total.min(load.vm_memory);
                mem_available = mem_available.min(load.vm_memory.saturating_sub(committed));
            }
            coordinator::placement::HostLoad {
                node: n.id,
                up: st.is_some() && info.health.iter().all(|h| h.node != n.id || h.up),
                draining: info.draining.contains(&n.id),
                cores: load.cores,
                cpu_busy: f64::from(load.cpu_busy_permille) / 1000.0,
                vcpus: vms.iter().map(|c| c.vcpus).sum(),
                mem_total,
                mem_available,
                disk_free: 1,
                disk_total: 1,
                net_busy: None,
            }
        })
        .collect();
    let ratings = coordinator::placement::rate(
        &loads,
        &coordinator::placement::VmNeeds {
            vcpus: 1,
            memory: 1 << 30,
            disk: 0,
            preferred: vec![],
        },
        &coordinator::placement::Policy::default(),
    );
    let hosts: Vec<Value> = info
        .nodes
        .iter()
        .map(|n| {
            let st = status_of(n.id);
            let h = info.health.iter().find(|h| h.node == n.id);
            let r = ratings.iter().find(|r| r.node == n.id);
            let load = st.and_then(|s| s.load.clone()).unwrap_or_default();
            let health = match (st.is_some(), h.is_none_or(|h| h.up)) {
                (true, true) if info.draining.contains(&n.id) => "draining",
                (true, true) => "up",
                (false, true) => "not answering",
                (_, false) => "down",
            };
            json!({
                "id": n.id,
                "addrs": n.addrs,
                "health": health,
                "since": h.map_or(0, |h| h.since),
                "stars": r.map_or(0, |r| r.stars),
                "rating_reason": r.map(|r| r.reason.clone()).unwrap_or_default(),
                "cores": load.cores,
                "cpu_busy_pct": load.cpu_busy_permille / 10,
                "mem_total": load.mem_total,
                "mem_available": load.mem_available,
                "vm_memory": load.vm_memory,
                "leads": st.map(|s| s.groups.iter().filter(|g| g.role == "leader")
                    .map(|g| coordinator::metrics::group_name(g.group)).collect::<Vec<_>>()).unwrap_or_default(),
            })
        })
        .collect();
    let volumes: Vec<Value> = info
        .volumes
        .iter()
        .map(|v| {
            let coordinator = statuses
                .iter()
                .find(|s| s.groups.iter().any(|g| g.group == v.number && g.role == "leader"))
                .map_or(0, |s| s.node);
            let per_host: Vec<Value> = info
                .nodes
                .iter()
                .map(|n| {
                    let vs = status_of(n.id).and_then(|s| s.volumes.iter().find(|x| x.number == v.number));
                    match vs {
                        Some(vs) => json!({
                            "host": n.id, "state": vs.state, "reason": vs.reason,
                            "direct_bytes": vs.direct_read + vs.direct_written,
                            "redirected_bytes": vs.redirected_read + vs.redirected_written,
                        }),
                        None => json!({"host": n.id, "state": "Unknown", "reason": "the host does not answer"}),
                    }
                })
                .collect();
            json!({
                "number": v.number,
                "name": format!("Volume{}", v.number),
                "lun": v.lun,
                "capacity": v.capacity,
                "coordinator": coordinator,
                "hosts": per_host,
            })
        })
        .collect();
    let vms: Vec<Value> = info
        .vms
        .iter()
        .map(|r| {
            let cfg = VmConfig::from_role(r).ok();
            let rt = status_of(r.node).and_then(|s| s.vms.iter().find(|v| v.name == r.name));
            json!({
                "name": r.name,
                "host": r.node,
                "wanted": cfg.as_ref().map(|c| c.state.clone()).unwrap_or_default(),
                "state": rt.map(|v| v.state.clone()).unwrap_or_else(|| if r.node == 0 { "stopped".into() } else { "unknown".into() }),
                "memory": cfg.as_ref().map_or(0, |c| c.memory),
                "vcpus": cfg.as_ref().map_or(0, |c| c.vcpus),
                "disk": cfg.as_ref().map(|c| c.disk.clone()).unwrap_or_default(),
                "migrate_to": cfg.as_ref().and_then(|c| c.migrate_to),
                "migration": rt.map(|v| v.migration.clone()).unwrap_or_default(),
                "migration_pct": rt.map_or(0, |v| v.migration_pct),
                "last_migration": cfg.as_ref().and_then(|c| c.last_migration.clone()),
                "heartbeats": rt.map_or(0, |v| v.heartbeats),
            })
        })
        .collect();
    json!({
        "cluster": cluster,
        "at": now_ms(),
        "hosts": hosts,
        "volumes": volumes,
        "vms": vms,
    })
}

/// What changed between two rounds, as (kind, text) events.
pub fn diff(old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let by = |v: &Value, list: &str, key: &str| -> BTreeMap<String, Value> {
        v[list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| (x[key].to_string(), x.clone()))
            .collect()
    };
    let (oh, nh) = (by(old, "hosts", "id"), by(new, "hosts", "id"));
    for (id, h) in &nh {
        match oh.get(id) {
            None => out.push(("host".into(), format!("host {id} joined the cluster"))),
            Some(o) if o["health"] != h["health"] => out.push((
                "host".into(),
                format!(
                    "host {id}: {} → {}",
                    o["health"].as_str().unwrap_or("?"),
                    h["health"].as_str().unwrap_or("?")
                ),
            )),
            _ => {}
        }
    }
    for id in oh.keys().filter(|k| !nh.contains_key(*k)) {
        out.push(("host".into(), format!("host {id} left the cluster")));
    }
    let (ov, nv) = (by(old, "volumes", "number"), by(new, "volumes", "number"));
    for (n, v) in &nv {
        let Some(o) = ov.get(n) else {
            out.push(("volume".into(), format!("Volume{n} added")));
            continue;
        };
        if o["coordinator"] != v["coordinator"] && v["coordinator"] != 0 {
            out.push((
                "volume".into(),
                format!("Volume{n}: coordinator now host {}", v["coordinator"]),
            ));
        }
        let oh = by(o, "hosts", "host");
        for (h, s) in by(v, "hosts", "host") {
            if let Some(os) = oh.get(&h) {
                if os["state"] != s["state"] {
                    out.push((
                        "io".into(),
                        format!(
                            "Volume{n} on host {h}: {} → {} ({})",
                            os["state"].as_str().unwrap_or("?"),
                            s["state"].as_str().unwrap_or("?"),
                            s["reason"].as_str().unwrap_or("")
                        ),
                    ));
                }
            }
        }
    }
    for n in ov.keys().filter(|k| !nv.contains_key(*k)) {
        out.push(("volume".into(), format!("Volume{n} removed")));
    }
    let (om, nm) = (by(old, "vms", "name"), by(new, "vms", "name"));
    for (name, v) in &nm {
        let label = name.trim_matches('"');
        match om.get(name) {
            None => out.push(("vm".into(), format!("{label}: added"))),
            Some(o) => {
                if o["host"] != v["host"] && v["host"] != 0 && o["host"] != 0 {
                    out.push((
                        "vm".into(),
                        format!(
                            "{label}: moved from host {} to host {}",
                            o["host"], v["host"]
                        ),
                    ));
                }
                if o["state"] != v["state"] {
                    out.push((
                        "vm".into(),
                        format!(
                            "{label}: {} → {}",
                            o["state"].as_str().unwrap_or("?"),
                            v["state"].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
    }
    for n in om.keys().filter(|k| !nm.contains_key(*k)) {
        out.push(("vm".into(), format!("{}: removed", n.trim_matches('"'))));
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// Prometheus text: this host's groups and I/O, and the cluster's VMs.
pub fn metrics_text(
    own: Option<&proto::NodeStatus>,
    info: &proto::ClusterInfo,
    statuses: &[proto::NodeStatus],
) -> String {
    let mut out = match own {
        Some(s) => coordinator::metrics::prometheus_text(std::slice::from_ref(s)),
        None => "# this host's status is unavailable\n".to_string(),
    };
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in rows {
            out.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
    };
    if let Some(s) = own {
        let h = s.node;
        let mut io = Vec::new();
        let mut mode = Vec::new();
        let mut switches = Vec::new();
        let mut asynch = Vec::new();
        for v in &s.volumes {
            let vol = format!("Volume{}", v.number);
            for (path, dir, b) in [
                ("direct", "read", v.direct_read),
                ("direct", "write", v.direct_written),
                ("redirected", "read", v.redirected_read),
                ("redirected", "write", v.redirected_written),
            ] {
                io.push((
                    format!("host=\"{h}\",volume=\"{vol}\",path=\"{path}\",op=\"{dir}\""),
                    b,
                ));
            }
            for m in [
                "Direct",
                "BlockRedirected",
                "FileSystemRedirected",
                "Fenced",
                "Unmounted",
            ] {
                mode.push((
                    format!("host=\"{h}\",volume=\"{vol}\",mode=\"{m}\""),
                    u64::from(v.state == m),
                ));
            }
            switches.push((format!("host=\"{h}\",volume=\"{vol}\""), v.redirect_events));
            asynch.push((format!("host=\"{h}\",volume=\"{vol}\""), v.async_bytes));
        }
        family("csv_volume_io_bytes_total", "counter", "Bytes this host moved to and from a volume's LUN, by path (direct: its own SAN path; redirected: through a peer)", io);
        family(
            "csv_volume_async_io_bytes_total",
            "counter",
            "Of the bytes over a volume's own path, those read or written asynchronously (Linux AIO on a LUN file or block device)",
            asynch,
        );
        family(
            "csv_volume_mode",
            "gauge",
            "1 for the I/O mode this host is in for a volume",
            mode,
        );
        family(
            "csv_volume_redirect_events_total",
            "counter",
            "Times this host's own path to a volume failed and its I/O switched to a peer",
            switches,
        );
        let vms: Vec<(String, u64)> = s
            .vms
            .iter()
            .map(|v| {
                (
                    format!(
                        "host=\"{h}\",vm=\"{}\",state=\"{}\"",
                        esc(&v.name),
                        esc(&v.state)
                    ),
                    1,
                )
            })
            .collect();
        family(
            "csv_vm_running_state",
            "gauge",
            "VMs this host runs, by state",
            vms,
        );
        let mem: Vec<(String, u64)> = s
            .vms
            .iter()
            .map(|v| {
                (
                    format!("host=\"{h}\",vm=\"{}\"", esc(&v.name)),
                    v.resident_peak,
                )
            })
            .collect();
        family(
            "csv_vm_resident_peak_bytes",
            "gauge",
            "Peak resident memory of each VM's VMM process on this host",
            mem,
        );
        let mig: Vec<(String, u64)> = s
            .vms
            .iter()
            .filter(|v| v.migrating_to != 0)
            .map(|v| {
                (
                    format!(
                        "host=\"{h}\",vm=\"{}\",to=\"{}\"",
                        esc(&v.name),
                        v.migrating_to
                    ),
                    u64::from(v.migration_pct),
                )
            })
            .collect();
        family(
            "csv_vm_migration_progress_percent",
            "gauge",
            "Live migrations this host is sending: pages sent against guest memory",
            mig,
        );
    }
    // Cluster-wide facts (the same on every host).
    let mut roles = Vec::new();
    let mut downtime = Vec::new();
    let mut total = Vec::new();
    for r in &info.vms {
        let Ok(c) = VmConfig::from_role(r) else {
            continue;
        };
        roles.push((
            format!(
                "vm=\"{}\",host=\"{}\",state=\"{}\"",
                esc(&r.name),
                r.node,
                esc(&c.state)
            ),
            1,
        ));
        if let Some(s) = c
            .last_migration
            .as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
        {
            let ms = |k: &str| s[k].as_f64().map_or(0, |v| v.round() as u64);
            downtime.push((format!("vm=\"{}\"", esc(&r.name)), ms("downtime_ms")));
            total.push((format!("vm=\"{}\"", esc(&r.name)), ms("total_ms")));
        }
    }
    family(
        "csv_vm_role",
        "gauge",
        "VM roles of the cluster: owner host (0: none) and wanted state",
        roles,
    );
    family(
        "csv_vm_last_migration_downtime_ms",
        "gauge",
        "Pause of each VM's last live migration",
        downtime,
    );
    family(
        "csv_vm_last_migration_total_ms",
        "gauge",
        "Duration of each VM's last live migration",
        total,
    );
    let up: Vec<(String, u64)> = info
        .nodes
        .iter()
        .map(|n| {
            let up = info.health.iter().all(|h| h.node != n.id || h.up)
                && statuses.iter().any(|s| s.node == n.id);
            (format!("host=\"{}\"", n.id), u64::from(up))
        })
        .collect();
    family(
        "csv_host_up",
        "gauge",
        "1 if the host is up and answers",
        up,
    );
    out
}

/// The page: plain HTML and a script that polls `/api/state`.
const PAGE: &str = include_str!("console.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_and_bad_ones_are_refused() {
        let r = parse_head(b"GET /api/state?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k")
            .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/api/state?x=1");
        assert_eq!(r.headers[1], ("Authorization".into(), "Bearer k".into()));
        assert!(parse_head(b"GET /").is_err());
        assert!(parse_head(b"GET http://x/ HTTP/1.1").is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\nno colon").is_err());
        assert!(parse_head(&[0xff, 0xfe]).is_err());
        let mut big = std::io::Cursor::new(vec![b'a'; MAX_HEAD + 10]);
        assert!(read_request(&mut big).is_err());
        let mut body =
            std::io::Cursor::new(b"POST / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n".to_vec());
        assert!(read_request(&mut body).unwrap_err().contains("too large"));
    }

    proptest::proptest! {
        #[test]
        fn any_request_head_is_parsed_or_refused(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_head(&b);
            let _ = read_request(&mut std::io::Cursor::new(b));
        }
    }

    #[test]
    fn state_changes_become_events() {
        let old = json!({"hosts": [{"id": 1, "health": "up"}, {"id": 2, "health": "up"}],
            "volumes": [{"number": 1, "coordinator": 1, "hosts": [{"host": 2, "state": "Direct", "reason": ""}]}],
            "vms": [{"name": "a", "host": 1, "state": "running"}]});
        let new = json!({"hosts": [{"id": 1, "health": "up"}, {"id": 2, "health": "down"}],
            "volumes": [{"number": 1, "coordinator": 2, "hosts": [{"host": 2, "state": "BlockRedirected", "reason": "own path failed"}]}],
            "vms": [{"name": "a", "host": 2, "state": "running"}]});
        let ev: Vec<String> = diff(&old, &new).into_iter().map(|e| e.1).collect();
        assert!(ev.contains(&"host 2: up → down".to_string()), "{ev:?}");
        assert!(
            ev.iter().any(|e| e.contains("coordinator now host 2")),
            "{ev:?}"
        );
        assert!(
            ev.iter()
                .any(|e| e.contains("Direct → BlockRedirected (own path failed)")),
            "{ev:?}"
        );
        assert!(
            ev.iter().any(|e| e.contains("moved from host 1 to host 2")),
            "{ev:?}"
        );
        assert!(diff(&new, &new).is_empty());
    }
}
