//! `meta` suite: metadata operations through a 3-host quorum on loopback,
//! ours (three `csvd` processes) against etcd 3.4 (three `etcd`
//! processes), on the same machine and disk, alternating.
//!
//! Both are Raft groups that fsync their log before acknowledging, so the
//! same operation costs each one quorum commit:
//! - `create+close`: ours creates a file, then hands back its lease
//!   (`RevokeLease`): two commits; etcd puts a new key, then puts it again;
//! - `lookup`: ours looks a name up with a linearizable (ReadIndex) read;
//!   etcd reads a key with its default linearizable range;
//! - `setattr`: ours changes a file's mode; etcd overwrites a key.
//!
//! Each runs with 1 client and with 16 concurrent clients (threads, one
//! connection each); rows give operations per second and the p50 and p99
//! latency. Last, the leader-failover stall: a client creates files while
//! the leader is killed with SIGKILL, three times; the row is the longest
//! gap between two acknowledged creates (etcd's client there moves to the
//! next endpoint on a failed connection, as ours does).

use crate::table::{self, Row};
use anyhow::{bail, Context, Result};
use coordinator::meta::ROOT;
use coordinator::proto::{self, NodeKind};
use csv_test_support::csvd::CsvCluster;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VOL: u64 = 1;

/// Per-thread operation: called with a running counter.
type Op<'a> = Box<dyn FnMut(u64) -> Result<()> + Send + 'a>;

struct Measured {
    ops: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `threads` workers for `secs`; each gets its operation from `make`.
fn measure<'a>(
    threads: usize,
    secs: f64,
    make: &(dyn Fn(usize) -> Result<Op<'a>> + Sync),
) -> Result<Measured> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Vec<f64>> {
                    let mut op = make(t)?;
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        op(i)?;
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("worker panicked")))
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    if all.is_empty() {
        bail!("no operation completed");
    }
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(Measured {
        ops: all.len() as f64 / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

// ---- etcd, spoken to through its JSON gateway over keep-alive HTTP/1.1 ----

struct Etcd {
    procs: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    clients: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Etcd {
    fn start(n: usize) -> Result<Etcd> {
        let dir = csv_test_support::temp_dir("etcd")?;
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            peers.push(csv_test_support::free_port()?);
            clients.push(SocketAddr::from((
                [127, 0, 0, 1],
                csv_test_support::free_port()?,
            )));
        }
        let initial: Vec<String> = (0..n)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
            .collect();
        let args = (0..n)
            .map(|i| {
                vec![
                    "--name".into(),
                    format!("e{i}"),
                    "--data-dir".into(),
                    dir.path().join(format!("e{i}")).display().to_string(),
                    "--listen-client-urls".into(),
                    format!("http://{}", clients[i]),
                    "--advertise-client-urls".into(),
                    format!("http://{}", clients[i]),
                    "--listen-peer-urls".into(),
                    format!("http://127.0.0.1:{}", peers[i]),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://127.0.0.1:{}", peers[i]),
                    "--initial-cluster".into(),
                    initial.join(","),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    "csvt-bench".into(),
                    // etcd's tuning for a LAN: 100 ms heartbeats, 1 s
                    // election timeout (ours: 100 ms and 0.5-1 s).
                    "--heartbeat-interval".into(),
                    "100".into(),
                    "--election-timeout".into(),
                    "1000".into(),
                ]
            })
            .collect();
        let mut e = Etcd {
            procs: (0..n).map(|_| None).collect(),
            args,
            clients,
            dir,
        };
        for i in 0..n {
            e.start_member(i)?;
        }
        let mut c = e.client();
        let t = Instant::now();
        while c.put(b"warmup", b"1").is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("etcd did not come up in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(e)
    }

    /// Starts member `i` (again: an existing data directory is rejoined).
    fn start_member(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("e{i}.log")))?;
        let c = Command::new("etcd")
            .args(&self.args[i])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd (is etcd-server installed?)")?;
        self.procs[i] = Some(c);
        Ok(())
    }

    fn client(&self) -> EtcdClient {
        EtcdClient {
            endpoints: self.clients.clone(),
            cur: 0,
            conn: None,
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Index of the member that leads, asked of the running members.
    fn leader(&self) -> Option<usize> {
        for (i, a) in self.clients.iter().enumerate() {
            if self.procs[i].is_none() {
                continue;
            }
            let mut c = EtcdClient {
                endpoints: vec![*a],
                cur: 0,
                conn: None,
            };
            let Ok(body) = c.post_once("/v3/maintenance/status", "{}") else {
                continue;
            };
            let (Some(me), Some(leader)) =
                (json_field(&body, "member_id"), json_field(&body, "leader"))
            else {
                continue;
            };
            if me == leader {
                return Some(i);
            }
        }
        None
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

/// The string value of `"field":"..."` in a JSON text (enough for etcd's
/// status answers, which quote their 64-bit numbers).
fn json_field(body: &str, field: &str) -> Option<String> {
    let pat = format!("\"{field}\":\"");
    let start = body.find(&pat)? + pat.len();
    let end = body[start..].find('"')? + start;
    Some(body[start..end].to_string())
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct EtcdClient {
    endpoints: Vec<SocketAddr>,
    cur: usize,
    conn: Option<BufReader<TcpStream>>,
}

impl EtcdClient {
    fn post_once(&mut self, path: &str, body: &str) -> Result<String> {
        if self.conn.is_none() {
            let a = self.endpoints[self.cur % self.endpoints.len()];
            let s = TcpStream::connect_timeout(&a, Duration::from_millis(500))?;
            s.set_nodelay(true)?;
            // As our client's attempt timeout is for a dead connection, a
            // request forwarded to a dead leader is given up after 1 s.
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            self.conn = Some(BufReader::new(s));
        }
        let r = self.exchange(path, body);
        if r.is_err() {
            self.conn = None;
            self.cur += 1;
        }
        r
    }

    fn exchange(&mut self, path: &str, body: &str) -> Result<String> {
        let c = self.conn.as_mut().context("not connected")?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        c.get_mut().write_all(req.as_bytes())?;
        let mut status = String::new();
        c.read_line(&mut status)?;
        let mut len = None;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            c.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = Some(v.trim().parse::<usize>()?);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                let mut l = String::new();
                c.read_line(&mut l)?;
                let n = usize::from_str_radix(l.trim(), 16)?;
                let mut b = vec![0u8; n + 2];
                c.read_exact(&mut b)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&b[..n]);
            }
        } else {
            let mut b = vec![0u8; len.context("etcd answered without a length")?];
            c.read_exact(&mut b)?;
            out = b;
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        if !status.contains(" 200 ") {
            bail!("etcd: {} {text}", status.trim());
        }
        Ok(text)
    }

    /// Retries on other endpoints for up to 30 s (an election).
    fn post(&mut self, path: &str, body: &str) -> Result<String> {
        let t = Instant::now();
        loop {
            match self.post_once(path, body) {
                Ok(b) => return Ok(b),
                Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn put(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v));
        self.post("/v3/kv/put", &body).map(|_| ())
    }

    fn get(&mut self, k: &[u8]) -> Result<()> {
        let body = format!(r#"{{"key":"{}"}}"#, b64(k));
        let r = self.post("/v3/kv/range", &body)?;
        if !r.contains("\"kvs\"") {
            bail!("etcd: key not found: {r}");
        }
        Ok(())
    }
}

// ---- ours ----

fn ours_create_close<'a>(
    cl: &'a CsvCluster,
    tag: &'a str,
) -> impl Fn(usize) -> Result<Op<'a>> + Sync + 'a {
    move |t| {
        let mut c = cl.client();
        Ok(Box::new(move |i: u64| {
            let a = c
                .create(
                    VOL,
                    ROOT,
                    &format!("{tag}-{t}-{i}"),
                    NodeKind::File,
                    0o644,
                    "",
                )
                .map_err(|e| anyhow::anyhow!("create: {e}"))?;
            c.volume_op(
                VOL,
                proto::volume_op::Op::RevokeLease(proto::RevokeLeaseOp {
                    node: 1,
                    ino: a.ino,
                    ..Default::default()
                }),
            )
            .map_err(|e| anyhow::anyhow!("close: {e}"))?;
            Ok(())
        }) as Op<'a>)
    }
}

/// The failover stall on our side: the longest gap between two
/// acknowledged creates of one client while the volume's leader is killed
/// (SIGKILL, restarted 2.5 s later) `kills` times.
fn ours_failover_stall(cl: &mut CsvCluster, kills: usize) -> Result<Duration> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> Result<Duration> {
        let mut c = cl.client();
        let stop = &stop;
        let w = s.spawn(move || -> Result<Duration> {
            let mut gap = Duration::ZERO;
            let mut last = Instant::now();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.create(VOL, ROOT, &format!("fo{i}"), NodeKind::File, 0o644, "")
                    .map_err(|e| anyhow::anyhow!("create: {e}"))?;
                gap = gap.max(last.elapsed());
                last = Instant::now();
                i += 1;
            }
            Ok(gap)
        });
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(700));
            let l = cl.wait_leader(VOL, Duration::from_secs(10))?;
            cl.kill(l)?;
            std::thread::sleep(Duration::from_millis(2500));
            cl.start(l)?;
        }
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?
    })
}

/// The failover stall on etcd's side: the longest gap between two
/// acknowledged puts of one client while the leader is killed (SIGKILL,
/// restarted 2.5 s later) `kills` times.
fn etcd_failover_stall(etcd: &mut Etcd, kills: usize) -> Result<Duration> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let clients = etcd.client();
    std::thread::scope(|s| -> Result<Duration> {
        let stop = &stop;
        let w = s.spawn(move || -> Result<Duration> {
            let mut e = clients;
            let mut gap = Duration::ZERO;
            let mut last = Instant::now();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                e.put(format!("fo{i}").as_bytes(), b"x")?;
                gap = gap.max(last.elapsed());
                last = Instant::now();
                i += 1;
            }
            Ok(gap)
        });
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(700));
            let t = Instant::now();
            let l = loop {
                if let Some(l) = etcd.leader() {
                    break l;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("etcd has no leader");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            etcd.kill(l);
            std::thread::sleep(Duration::from_millis(2500));
            etcd.start_member(l)?;
        }
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?
    })
}

/// The `meta` suite's options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Length of each side's run per row, seconds (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    secs: f64,
    /// Leader kills (SIGKILL, restarted 2.5 s later) during the failover
    /// rows, on each side.
    #[arg(long, value_name = "N", default_value_t = 3)]
    kills: usize,
}

pub fn run(args: Args) -> Result<()> {
    let Args { secs, kills } = args;
    eprintln!(
        "meta bench: 3 csvd hosts against 3 etcd members on loopback, {secs} s per side and row"
    );
    let mut cl = CsvCluster::loopback(3)?;
    cl.start_all()?;
    cl.client()
        .add_volume(proto::VolumeInfo {
            number: VOL,
            lun: "/dev/null".into(),
            data_start: 1 << 20,
            capacity: 1 << 40,
            voters: vec![],
            now: 0,
        })
        .map_err(|e| anyhow::anyhow!("add volume: {e}"))?;
    cl.wait_leader(VOL, Duration::from_secs(10))?;
    let mut etcd = Etcd::start(3)?;

    // Names for lookup and setattr.
    const FIXED: u64 = 256;
    let mut c = cl.client();
    let mut inos = Vec::new();
    let mut e = etcd.client();
    for i in 0..FIXED {
        inos.push(
            c.create(VOL, ROOT, &format!("fixed{i}"), NodeKind::File, 0o644, "")
                .map_err(|e| anyhow::anyhow!("create: {e}"))?
                .ino,
        );
        e.put(format!("fixed{i}").as_bytes(), b"x")?;
    }

    let mut rows = Vec::new();
    let mut push = |name: String, o: &Measured, p: &Measured, unit_ops: &'static str| {
        rows.push(Row {
            name: format!("{name} ops/s"),
            ours: o.ops,
            peer: Some(p.ops),
            unit: unit_ops,
            higher_is_better: true,
        });
        rows.push(Row {
            name: format!("{name} p50"),
            ours: o.p50_ms,
            peer: Some(p.p50_ms),
            unit: "ms",
            higher_is_better: false,
        });
        rows.push(Row {
            name: format!("{name} p99"),
            ours: o.p99_ms,
            peer: Some(p.p99_ms),
            unit: "ms",
            higher_is_better: false,
        });
    };
    for threads in [1usize, 16] {
        let tag = format!("cc{threads}");
        let o = measure(threads, secs, &ours_create_close(&cl, &tag))?;
        let p = measure(threads, secs, &|t| {
            let mut e = etcd.client();
            let tag = tag.clone();
            Ok(Box::new(move |i: u64| {
                let k = format!("{tag}-{t}-{i}");
                e.put(k.as_bytes(), b"x")?;
                e.put(k.as_bytes(), b"closed")
            }) as Op)
        })?;
        push(
            format!("create+close, {threads} client(s)"),
            &o,
            &p,
            "pairs/s",
        );

        let p = measure(threads, secs, &|t| {
            let mut e = etcd.client();
            Ok(Box::new(move |i: u64| {
                e.get(format!("fixed{}", (i * 7 + t as u64) % FIXED).as_bytes())
            }) as Op)
        })?;
        let o = measure(threads, secs, &|t| {
            let mut c = cl.client();
            Ok(Box::new(move |i: u64| {
                c.lookup(VOL, ROOT, &format!("fixed{}", (i * 7 + t as u64) % FIXED))
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("lookup: {e}"))
            }) as Op)
        })?;
        push(format!("lookup, {threads} client(s)"), &o, &p, "ops/s");

        let inos = &inos;
        let o = measure(threads, secs, &|t| {
            let mut c = cl.client();
            Ok(Box::new(move |i: u64| {
                let ino = inos[((i * 7 + t as u64) % FIXED) as usize];
                c.setattr(
                    VOL,
                    proto::SetAttrOp {
                        ino,
                        mode: Some(0o600 | (i as u32 & 0o77)),
                        ..Default::default()
                    },
                )
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("setattr: {e}"))
            }) as Op)
        })?;
        let p = measure(threads, secs, &|t| {
            let mut e = etcd.client();
            Ok(Box::new(move |i: u64| {
                e.put(
                    format!("fixed{}", (i * 7 + t as u64) % FIXED).as_bytes(),
                    format!("{i}").as_bytes(),
                )
            }) as Op)
        })?;
        push(format!("setattr, {threads} client(s)"), &o, &p, "ops/s");
    }

    // Failover stall: the longest gap a creating client sees while the
    // leader is killed, `kills` times.
    let ours_stall = ours_failover_stall(&mut cl, kills)?;
    let etcd_stall = etcd_failover_stall(&mut etcd, kills)?;
    rows.push(Row {
        name: format!("failover stall, longest client gap ({kills} leader kills)"),
        ours: ours_stall.as_secs_f64() * 1e3,
        peer: Some(etcd_stall.as_secs_f64() * 1e3),
        unit: "ms",
        higher_is_better: false,
    });
    table::print(
        "meta: metadata operations through a 3-host quorum (loopback)",
        "etcd 3.4",
        &rows,
    );
    Ok(())
}
