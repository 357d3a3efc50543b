#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use switchboard::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "config/switchboard.toml";

/// Switchboard: complaint-intake gateway. Channels in, canonical complaint records out to Kafka
/// (or the local spool), acknowledged only once durable.
#[derive(Parser)]
#[command(name = "switchboard", version, propagate_version = true)]
struct Cli {
    /// Config file [default: config/switchboard.toml; built-in defaults if that file is absent].
    /// Any key can be overridden by env: SWITCHBOARD_<SECTION>__<KEY>, e.g.
    /// SWITCHBOARD_KAFKA__BROKERS=127.0.0.1:9092.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Serve,
    /// Load and validate the config (file + env), print the effective config with every secret
    /// shown as "<redacted>", exit.
    CheckConfig,
    /// Sign a /v1/events body with the configured api secret (or --secret), for curl and tests.
    Sign {
        /// File with the exact body to send; `-` or absent reads stdin.
        file: Option<PathBuf>,
        /// Secret to sign with [default: the first of api.secrets].
        #[arg(long)]
        secret: Option<String>,
        /// Unix timestamp to sign [default: now].
        #[arg(long)]
        timestamp: Option<i64>,
        /// Output: `curl` (-H arguments), `headers` (two header lines), `json`.
        #[arg(long, default_value = "curl")]
        format: String,
    },
    /// Inspect the local spool, or forward its backlog to Kafka.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Segments, records, bytes, torn segments, and the backlog (records past the replay cursor,
    /// not yet forwarded to Kafka) with the cursor.
    Stats {
        /// Spool directory [default: spool.dir from the config].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print every record in the spool as one JSON line each, oldest first.
    Cat {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Forward the backlog of a stopped gateway's spool to the configured Kafka (kafka.brokers),
    /// in order, then exit. Refuses while a gateway holds the spool's LOCK.
    Replay {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Give up after this long (what is not forwarded stays in the spool).
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
}

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    let env = std::env::vars();
    match path {
        Some(p) => Config::load(&p, env).map_err(|e| e.to_string()),
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG);
            if p.exists() {
                Config::load(&p, env).map_err(|e| e.to_string())
            } else {
                Config::from_toml_str("", env).map_err(|e| e.to_string())
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match load_config(cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg),
        Command::CheckConfig => {
            match switchboard::config::redact::to_redacted_toml(&cfg) {
                Ok(s) => println!("{s}"),
                Err(e) => return fail(&e.to_string()),
            }
            match switchboard::triage::Triager::check(&cfg.triage) {
                Ok(summary) => eprintln!("switchboard: {summary}"),
                Err(e) => return fail(&format!("triage rules: {e}")),
            }
            match switchboard::tls::check(&cfg) {
                Ok(0) => {}
                Ok(n) => eprintln!("switchboard: {n} TLS certificate(s) load and match their keys"),
                Err(e) => return fail(&format!("tls: {e}")),
            }
            eprintln!("switchboard: configuration is valid");
            Ok(())
        }
        Command::Sign {
            file,
            secret,
            timestamp,
            format,
        } => sign(&cfg, file, secret, timestamp, &format),
        Command::Spool { command } => spool(&cfg, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &str) -> ExitCode {
    eprintln!("switchboard: {e}");
    ExitCode::FAILURE
}

fn serve(cfg: Config) -> Result<(), String> {
    let _log = switchboard::telemetry::init_logging(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchboard")
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(switchboard::app::serve(cfg))
}

fn sign(
    cfg: &Config,
    file: Option<PathBuf>,
    secret: Option<String>,
    timestamp: Option<i64>,
    format: &str,
) -> Result<(), String> {
    let mut body = Vec::new();
    match file.as_deref() {
        None => std::io::stdin().read_to_end(&mut body),
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_end(&mut body),
        Some(p) => std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut body)),
    }
    .map_err(|e| format!("cannot read body: {e}"))?;
    let secret = secret
        .or_else(|| cfg.api.secrets.first().cloned())
        .ok_or("no secret: pass --secret or set api.secrets")?;
    let ts = timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp());
    let sig = switchboard::auth::sign_hex(&secret, &[ts.to_string().as_bytes(), b".", &body]);
    match format {
        "curl" => println!("-H X-Switchboard-Timestamp:{ts} -H X-Switchboard-Signature:v1={sig}"),
        "headers" => println!("X-Switchboard-Timestamp: {ts}\nX-Switchboard-Signature: v1={sig}"),
        "json" => println!(
            "{}",
            serde_json::json!({"timestamp": ts, "signature": format!("v1={sig}")})
        ),
        other => return Err(format!("--format {other}: expected curl, headers or json")),
    }
    Ok(())
}

fn spool(cfg: &Config, cmd: SpoolCommand) -> Result<(), String> {
    use switchboard::sink::spool::{read_all, stats_of};
    let shown = |d: &std::path::Path| d.display().to_string();
    match cmd {
        SpoolCommand::Stats { dir } => {
            let dir = dir.unwrap_or_else(|| cfg.spool.dir.clone());
            let stats = stats_of(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            println!(
                "{}",
                serde_json::json!({"dir": shown(&dir), "segments": stats.segments, "records": stats.records, "bytes": stats.bytes, "torn_segments": stats.torn, "backlog_records": stats.backlog_records, "backlog_bytes": stats.backlog_bytes, "cursor": stats.cursor})
            );
        }
        SpoolCommand::Cat { dir } => {
            use std::io::Write;
            let dir = dir.unwrap_or_else(|| cfg.spool.dir.clone());
            let (records, _) = read_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut out = std::io::stdout().lock();
            for r in records {
                out.write_all(&r)
                    .and_then(|_| out.write_all(b"\n"))
                    .map_err(|e| e.to_string())?;
            }
        }
        SpoolCommand::Replay { dir, timeout_secs } => {
            let mut cfg = cfg.clone();
            if let Some(d) = dir {
                cfg.spool.dir = d;
            }
            switchboard::telemetry::init_logging(&cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let out = rt.block_on(switchboard::app::forward_backlog(
                &cfg,
                std::time::Duration::from_secs(timeout_secs),
            ))?;
            println!(
                "{}",
                serde_json::json!({"dir": shown(&cfg.spool.dir), "replayed": out.replayed, "errors": out.errors, "seconds": out.seconds, "records_per_second": (out.replayed as f64 / out.seconds.max(1e-9)).round(), "backlog_records": out.backlog_records})
            );
            if out.backlog_records > 0 {
                return Err(format!(
                    "{} records are still in the spool (Kafka did not take them within {timeout_secs} s)",
                    out.backlog_records
                ));
            }
        }
    }
    Ok(())
}
