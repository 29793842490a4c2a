//! The web console and metrics endpoint `csvd --console ADDR` serves, on
//! axum (hyper) over a small tokio runtime of its own.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the console: hosts, volumes, VMs, migrations, events; live |
//! | `GET /api/state` | the same as JSON (what the page polls every second) |
//! | `GET /metrics` | OpenMetrics text (see docs/OPERATIONS.md) |
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
//!
//! - [`state`]: the JSON and its events; [`crate::metrics`]: `/metrics`.

pub mod state;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use coordinator::client::{self, Client};
use coordinator::proto;
use coordinator::wire::{ct_eq, Identity};
use hypervisor_shim::supervisor::role::VmConfig;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The page: plain HTML and a script that polls `/api/state`.
const PAGE: &str = include_str!("page.html");

/// The operator token for console actions: HMAC of a fixed label under
/// the cluster key, as hex.
pub fn action_token(me: &Identity) -> String {
    coordinator::wire::hex(&me.key.join_secret(&me.cluster, b"csv-console-actions", 0))
}

/// Why the console did not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Its address.
    #[error("serving the console on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its threads.
    #[error("starting the console's threads")]
    Thread(#[source] std::io::Error),
}

/// Why a console action was refused.
#[derive(Debug, thiserror::Error)]
enum ActionError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Role(#[from] hypervisor_shim::supervisor::role::RoleError),
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

/// What a console serves with.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Where it serves.
    pub addr: SocketAddr,
    /// This host's identity (the cluster key gives the operator token).
    pub identity: Identity,
    /// This host's own cluster address (it gathers through it).
    pub own: SocketAddr,
    /// Actions allowed (with the token).
    pub actions: bool,
}

fn headers() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ]
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        headers(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

impl Console {
    /// Serves on `cfg.addr` until `stop`, gathering through this host.
    pub fn start(cfg: ConsoleConfig, stop: Arc<AtomicBool>) -> Result<Arc<Console>, ConsoleError> {
        let l = std::net::TcpListener::bind(cfg.addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ConsoleError::Bind {
                addr: cfg.addr,
                source,
            })?;
        let c = Arc::new(Console {
            token: action_token(&cfg.identity),
            open_reads: cfg.addr.ip().is_loopback(),
            me: Identity {
                node: 0,
                ..cfg.identity
            },
            own: cfg.own,
            actions: cfg.actions,
            shared: Mutex::default(),
        });
        let g = c.clone();
        let gather_stop = stop.clone();
        std::thread::Builder::new()
            .name("csv-console".into())
            .spawn(move || {
                while !gather_stop.load(Ordering::Relaxed) {
                    g.gather();
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map_err(ConsoleError::Thread)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ConsoleError::Thread)?;
        let app = Router::new()
            .route("/", get(page))
            .route("/index.html", get(page))
            .route("/api/state", get(api_state))
            .route("/metrics", get(metrics))
            .route("/api/vms/{name}/migrate", post(migrate))
            .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n") })
            .with_state(c.clone());
        std::thread::Builder::new()
            .name("csv-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("console: {e}");
                            return;
                        }
                    };
                    let until = async move {
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    };
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(until)
                        .await
                    {
                        tracing::error!("console: {e}");
                    }
                });
            })
            .map_err(ConsoleError::Thread)?;
        Ok(c)
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
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
        let state = state::build_state(&self.me.cluster, &info, &statuses);
        let mut sh = self.shared();
        let changes = if sh.state.is_null() {
            vec![]
        } else {
            state::diff(&sh.state, &state)
        };
        for (what, text) in changes {
            state::push_event(&mut sh.events, &what, text);
        }
        sh.state = state;
        sh.statuses = statuses;
        sh.info = info;
    }

    fn event(&self, what: &str, text: String) {
        state::push_event(&mut self.shared().events, what, text);
    }

    fn state_json(&self) -> Value {
        let sh = self.shared();
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
        let (info, statuses) = {
            let sh = self.shared();
            (sh.info.clone(), sh.statuses.clone())
        };
        // This host's own status, fresh.
        let own = client::node_status(&self.me, self.own, Duration::from_secs(2)).ok();
        crate::metrics::render(own.as_ref(), &info, &statuses)
    }

    /// Whether a read may go on: open on loopback, else with the token
    /// (header, or `token=` in the query).
    fn may_read(&self, h: &HeaderMap, q: &HashMap<String, String>) -> bool {
        self.open_reads
            || [bearer(h), q.get("token").map(String::as_str)]
                .into_iter()
                .flatten()
                .any(|t| ct_eq(t.trim().as_bytes(), self.token.as_bytes()))
    }

    fn refuse_read() -> Response {
        text(
            StatusCode::UNAUTHORIZED,
            "this console needs the operator token: `Authorization: Bearer TOKEN` or ?token=TOKEN (csvctl cluster console-token)\n",
        )
    }

    fn migrate_vm(&self, name: &str, to: u64, quick: bool) -> Result<(), ActionError> {
        let refused = |s: String| ActionError::Refused(s);
        let mut cl = Client::new(self.me.clone(), vec![self.own]);
        let info = cl
            .cluster_info()
            .map_err(|e| refused(client::describe(&e)))?;
        let role = info
            .vms
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| refused(format!("no VM role {name:?}")))?;
        let mut cfg = VmConfig::from_role(role)?;
        if !cfg.is_running() || role.node == 0 {
            return Err(refused(format!("{name} is not running")));
        }
        if role.node == to {
            return Err(refused(format!("{name} runs on host {to} already")));
        }
        if !info.nodes.iter().any(|n| n.id == to) {
            return Err(refused(format!("no host {to}")));
        }
        cfg.migrate_to = Some(to);
        cfg.migrate_quick = quick;
        cl.set_vm_role(proto::VmRole {
            name: role.name.clone(),
            node: role.node,
            config: cfg.to_bytes(),
        })
        .map_err(|e| refused(client::describe(&e)))
    }
}

type Q = Query<HashMap<String, String>>;

async fn page(State(c): State<Arc<Console>>, h: HeaderMap, Query(q): Q) -> Response {
    if !c.may_read(&h, &q) {
        return Console::refuse_read();
    }
    (
        headers(),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE,
    )
        .into_response()
}

async fn api_state(State(c): State<Arc<Console>>, h: HeaderMap, Query(q): Q) -> Response {
    if !c.may_read(&h, &q) {
        return Console::refuse_read();
    }
    (headers(), axum::Json(c.state_json())).into_response()
}

async fn metrics(State(c): State<Arc<Console>>, h: HeaderMap, Query(q): Q) -> Response {
    if !c.may_read(&h, &q) {
        return Console::refuse_read();
    }
    match tokio::task::spawn_blocking(move || c.metrics()).await {
        Ok(body) => (
            headers(),
            [(header::CONTENT_TYPE, coordinator::metrics::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn migrate(
    State(c): State<Arc<Console>>,
    Path(name): Path<String>,
    h: HeaderMap,
    Query(q): Q,
) -> Response {
    if !c.actions {
        return text(
            StatusCode::FORBIDDEN,
            "this console is read-only (csvd runs without --console-actions)\n",
        );
    }
    if !bearer(&h).is_some_and(|t| ct_eq(t.trim().as_bytes(), c.token.as_bytes())) {
        return text(
            StatusCode::UNAUTHORIZED,
            "an action needs `Authorization: Bearer TOKEN` (csvctl cluster console-token)\n",
        );
    }
    let Some(to) = q.get("to").and_then(|t| t.parse::<u64>().ok()) else {
        return text(StatusCode::BAD_REQUEST, "migrate needs ?to=HOST\n");
    };
    let quick = q.get("quick").is_some_and(|v| v == "1");
    let c2 = c.clone();
    let n2 = name.clone();
    let r = tokio::task::spawn_blocking(move || c2.migrate_vm(&n2, to, quick)).await;
    let answer = match r {
        Ok(Ok(())) => {
            c.event(
                "vm",
                format!("{name}: migration to host {to} asked from the console"),
            );
            return (headers(), axum::Json(json!({"ok": true}))).into_response();
        }
        Ok(Err(e)) => coordinator::service::error_chain(&e),
        Err(e) => e.to_string(),
    };
    (
        StatusCode::BAD_REQUEST,
        headers(),
        axum::Json(json!({"ok": false, "error": answer})),
    )
        .into_response()
}
