//! `csvctl san`: look at the SAN through this host's own initiator.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use iscsi_initiator::login::{Chap, LoginConfig};
use iscsi_initiator::session::Data;
use iscsi_initiator::{new_isid, scsi, IscsiUrl, Lun, Session};
use std::process::ExitCode;
use vhd::size::human;

#[derive(Debug, Subcommand)]
pub enum SanCommand {
    /// List the targets a portal offers (SendTargets discovery).
    ///
    /// Example: csvctl san discover 10.0.0.5:3260
    Discover {
        /// host[:port] of the portal (port 3260 by default).
        portal: String,
        #[command(flatten)]
        who: Who,
    },
    /// List the LUNs of a target: size, block size, product, device ids.
    ///
    /// Example: csvctl san ls iscsi://10.0.0.5/iqn.2026-11.com.example:array1
    Ls {
        /// iscsi://[user@]host[:port]/target-iqn[/lun]
        url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        who: Who,
    },
    /// Show the persistent-reservation keys and the holder of a LUN.
    ///
    /// Example: csvctl san reservations iscsi://10.0.0.5/iqn.2026-11.com.example:array1/1
    Reservations {
        /// iscsi://[user@]host[:port]/target-iqn/lun
        url: String,
        #[command(flatten)]
        who: Who,
    },
}

/// Who this host is on the SAN.
#[derive(Debug, clap::Args)]
pub struct Who {
    /// Initiator name (default: iqn.2026-11.io.csv:<hostname>).
    #[arg(long)]
    initiator: Option<String>,
    /// CHAP user; the secret comes from the CSV_CHAP_SECRET environment
    /// variable, never from the command line.
    #[arg(long)]
    chap_user: Option<String>,
}

impl Who {
    fn initiator(&self) -> String {
        self.initiator.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            format!(
                "iqn.2026-11.io.csv:{}",
                if host.is_empty() { "host" } else { &host }
            )
        })
    }

    fn chap(&self, url: Option<&IscsiUrl>) -> Result<Option<Chap>> {
        if let Some(user) = &self.chap_user {
            let secret = std::env::var("CSV_CHAP_SECRET")
                .context("--chap-user needs the secret in CSV_CHAP_SECRET")?;
            return Ok(Some(Chap {
                user: user.clone(),
                secret,
            }));
        }
        Ok(match url {
            Some(IscsiUrl {
                user: Some(u),
                secret: Some(s),
                ..
            }) => Some(Chap {
                user: u.clone(),
                secret: s.clone(),
            }),
            Some(IscsiUrl {
                user: Some(_),
                secret: None,
                ..
            }) => {
                let secret = std::env::var("CSV_CHAP_SECRET")
                    .context("the URL names a CHAP user; put the secret in CSV_CHAP_SECRET")?;
                url.and_then(|u| u.user.clone())
                    .map(|user| Chap { user, secret })
            }
            _ => None,
        })
    }
}

pub fn run(cmd: SanCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            SanCommand::Discover { portal, who } => discover(&portal, &who).await,
            SanCommand::Ls { url, json, who } => ls(&url, json, &who).await,
            SanCommand::Reservations { url, who } => reservations(&url, &who).await,
        }
    })
}

fn with_port(p: &str) -> String {
    if p.rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        && !p.ends_with(']')
    {
        p.to_string()
    } else {
        format!("{p}:3260")
    }
}

async fn discover(portal: &str, who: &Who) -> Result<ExitCode> {
    let portal = with_port(portal);
    let found = iscsi_initiator::session::discover(&portal, &who.initiator(), who.chap(None)?)
        .await
        .with_context(|| format!("discovery at {portal} failed"))?;
    if found.is_empty() {
        println!("{portal} offers no targets to {}", who.initiator());
    }
    for (name, portals) in found {
        println!("{name}");
        for p in portals {
            println!("    {p}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn session(url: &IscsiUrl, who: &Who) -> Result<Session> {
    if url.target.is_empty() {
        bail!("{url} names no target: use iscsi://host/target-iqn[/lun] (csvctl san discover lists targets)");
    }
    let cfg = LoginConfig {
        initiator: who.initiator(),
        target: Some(url.target.clone()),
        isid: new_isid(),
        chap: who.chap(Some(url))?,
        mutual: None,
        offer: Default::default(),
    };
    Session::connect(&url.portal, &cfg)
        .await
        .with_context(|| format!("cannot log in to {url}"))
}

async fn ls(url: &str, json: bool, who: &Who) -> Result<ExitCode> {
    let url: IscsiUrl = url.parse()?;
    let s = session(&url, who).await?;
    let r = s
        .command(0, scsi::report_luns(4096), Data::In(4096))
        .await?;
    let mut luns = scsi::parse_report_luns(&r.data);
    if url.lun != 0 {
        luns.retain(|&l| l == url.lun);
    }
    let mut rows = Vec::new();
    for n in luns {
        let Ok(lun) = Lun::open(s.clone(), n).await else {
            continue;
        };
        let inq = lun.inquiry().await.ok();
        if inq.as_ref().is_some_and(|i| i.device_type != 0) {
            continue; // controllers and other non-disk LUNs
        }
        let ids = lun.device_ids().await.unwrap_or_default();
        rows.push(serde_json::json!({
            "lun": n,
            "bytes": lun.capacity(),
            "block_size": lun.block_size(),
            "vendor": inq.as_ref().map(|i| i.vendor.clone()),
            "product": inq.as_ref().map(|i| i.product.clone()),
            "device_ids": ids,
        }));
    }
    let _ = s.logout().await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"target": url.target, "portal": url.portal, "luns": rows})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} at {}", url.target, url.portal);
    println!(
        "{:>4}  {:>10}  {:>6}  {:<24}  device ids",
        "LUN", "size", "block", "product"
    );
    for r in &rows {
        println!(
            "{:>4}  {:>10}  {:>6}  {:<24}  {}",
            r["lun"].as_u64().unwrap_or(0),
            human(r["bytes"].as_u64().unwrap_or(0)),
            r["block_size"].as_u64().unwrap_or(0),
            format!(
                "{} {}",
                r["vendor"].as_str().unwrap_or(""),
                r["product"].as_str().unwrap_or("")
            ),
            r["device_ids"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn reservations(url: &str, who: &Who) -> Result<ExitCode> {
    let url: IscsiUrl = url.parse()?;
    if url.lun == 0 {
        bail!("{url}: name the LUN, as in iscsi://host/target-iqn/1");
    }
    let s = session(&url, who).await?;
    let lun = Lun::open(s.clone(), url.lun).await?;
    let keys = lun.reservation_keys().await?;
    let holder = lun.reservation().await?;
    let _ = s.logout().await;
    println!("{url}");
    if keys.is_empty() {
        println!("  registered keys: none");
    } else {
        println!(
            "  registered keys: {}",
            keys.iter()
                .map(|k| format!("{k:#018x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match holder {
        Some((k, t)) => {
            let kind = match t {
                1 => "Write Exclusive",
                3 => "Exclusive Access",
                5 => "Write Exclusive - Registrants Only",
                6 => "Exclusive Access - Registrants Only",
                7 => "Write Exclusive - All Registrants",
                8 => "Exclusive Access - All Registrants",
                _ => "type",
            };
            println!("  reservation: {kind} ({t}) held by {k:#018x}");
        }
        None => println!("  reservation: none"),
    }
    Ok(ExitCode::SUCCESS)
}
