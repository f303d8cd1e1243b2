//! `ftvm-witness`: the arbiter that settles split-brain for ftvm FT pairs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ftvm_witness::config::PairConfig;
use ftvm_witness::{
    ClaimId, ClaimOutcome, ClientOptions, Config, Server, WitnessError, WitnessSet, WitnessTarget,
};

/// Exit code of `claim` when the claim is denied.
const EXIT_DENIED: u8 = 3;
/// Exit code when the witness could not be reached.
const EXIT_UNREACHABLE: u8 = 4;
/// Exit code when the witness refused the request (not authorized, unknown pair, ...).
const EXIT_REFUSED: u8 = 5;

#[derive(Parser)]
#[command(
    name = "ftvm-witness",
    version,
    about = "The witness of ftvm fault-tolerant VM pairs: it decides which node may run alone",
    long_about = "The witness of ftvm fault-tolerant VM pairs.\n\n\
For each FT pair it durably stores (generation, holder, claim id) and offers one atomic \
operation, claim(pair, node, seen_generation, claim_id): granted with generation seen+1 only if \
seen_generation is the current generation (repeated only for the exact claim it answered: same \
node, same claim id), otherwise denied with the current state. A node goes live alone only \
after the witness granted it the new generation, so two nodes can never both run as primary. \
Nodes authenticate with certificates from the deployment's CA (mutual TLS over QUIC); a node \
may claim only for the pairs that list its certificate identity.\n\n\
Typical setup:\n  \
ftvm-witness certs init --dir /etc/ftvm/tls --pair vm1 --nodes node-a,node-b\n  \
ftvm-witness serve --config /etc/ftvm/tls/witness.toml --init     (first start only)\n  \
ftvm-witness serve --config /etc/ftvm/tls/witness.toml\n\n\
Exit codes of claim/status: 0 granted/ok, 3 denied, 4 witness unreachable, 5 refused by the \
witness, 1 other errors, 2 bad command line."
)]
struct Cli {
    /// Log as JSON objects, one per line (default: key=value text). Logs go to stderr;
    /// FTVM_LOG sets the level (a tracing filter; default info), as for every ftvm binary.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the witness service.
    ///
    /// Prints one line `ftvm-witness ready listen=ADDR metrics=ADDR|off` on stdout when it
    /// accepts requests; logs (one structured line per decision) go to stderr.
    Serve(ServeArgs),
    /// Claim a pair's next generation for NODE (exit 0 granted, 3 denied).
    ///
    /// Prints the new generation when granted; `denied generation=G holder=H` when denied.
    Claim(ClaimArgs),
    /// Show a pair's current generation and holder.
    Status(StatusArgs),
    /// Certificate tooling.
    #[command(subcommand)]
    Certs(CertsCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// The configuration file (see `certs init`, which writes one).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Override the QUIC listen address of the configuration (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Override the data directory of the configuration.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Override (or turn on) the Prometheus metrics HTTP listener.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Create a new, empty data directory. Without it a missing or unreadable data
    /// directory is an error: the witness never silently starts from scratch.
    #[arg(long)]
    init: bool,
}

#[derive(Args)]
struct ClientArgs {
    /// The witness's address, `[NAME@]HOST:PORT` (NAME: its certificate identity, default
    /// --server-name). Several, comma separated, only for witnesses sharing one etcd store:
    /// they are tried in turn.
    #[arg(long, value_name = "ADDR", value_delimiter = ',', required = true)]
    witness: Vec<String>,
    /// The certificate directory holding ca.pem, NODE.pem and NODE.key.
    #[arg(long, value_name = "DIR")]
    tls: PathBuf,
    /// This node's identity (its certificate name).
    #[arg(long, value_name = "N")]
    node: String,
    /// The FT pair.
    #[arg(long, value_name = "P")]
    pair: String,
    /// The witness's certificate identity.
    #[arg(long, default_value = "witness", value_name = "NAME")]
    server_name: String,
    /// Time allowed for one attempt, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
    /// Attempts before giving up (rounds over every witness when several are given).
    #[arg(long, default_value_t = 3)]
    attempts: u32,
}

#[derive(Args)]
struct ClaimArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The generation this node last saw (0 for a pair never claimed).
    #[arg(long, value_name = "G")]
    seen: u64,
    /// The claim's id, 32 hex digits. Give the id of an earlier claim to retry it (its grant
    /// is repeated only for the same id); without it a fresh random id is used and printed
    /// on stderr.
    #[arg(long, value_name = "HEX")]
    claim_id: Option<ClaimId>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a new CA, a witness certificate, one certificate per node and DIR/witness.toml.
    ///
    /// Each certificate says what it is for: the nodes' are node certificates of pair P, the
    /// witness's a witness certificate (which ftvm-resync and the logging channel never accept
    /// as a node). The node certificates are also the ones the logging channel and ftvm-resync
    /// use. Copy ca.pem plus a node's NODE.pem/NODE.key to that node; keep ca.key offline.
    Init {
        /// Directory to write (created if needed).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The FT pair's name.
        #[arg(long, value_name = "P")]
        pair: String,
        /// The pair's node identities, comma separated.
        #[arg(long, value_name = "A,B", value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// The witness's identity.
        #[arg(long, default_value = "witness", value_name = "NAME")]
        witness_name: String,
        /// The listen address written into witness.toml.
        #[arg(long, default_value = "0.0.0.0:7400", value_name = "ADDR")]
        listen: SocketAddr,
        /// Replace an existing CA and witness.toml (every old certificate stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue certificates for more identities with the existing CA in DIR (needs ca.key).
    Issue {
        /// The certificate directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Identities, comma separated.
        #[arg(long, value_name = "A,B", value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Issue node certificates of pair P (what ftvm-resync and the logging channel need).
        #[arg(long, value_name = "P", conflicts_with = "witness")]
        pair: Option<String>,
        /// Issue witness certificates. Without --pair or --witness the certificates say
        /// nothing about what they are for and no node accepts them as a node.
        #[arg(long)]
        witness: bool,
        /// Replace existing certificates of the same names.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if cli.log_json {
        fmt.json().flatten_event(true).init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.cmd {
        Cmd::Serve(a) => report(run_async(serve(a))),
        Cmd::Claim(a) => run_async(claim(a)).unwrap_or_else(client_error),
        Cmd::Status(a) => run_async(status(a)).unwrap_or_else(client_error),
        Cmd::Certs(c) => report(certs(c)),
    }
}

fn run_async<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(f)
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvm-witness: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn client_error(e: anyhow::Error) -> ExitCode {
    eprintln!("ftvm-witness: error: {e:#}");
    match e.downcast_ref::<WitnessError>() {
        Some(w) if w.is_unreachable() => ExitCode::from(EXIT_UNREACHABLE),
        Some(WitnessError::Refused { .. }) => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::FAILURE,
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(&a.config)?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(m) = a.metrics {
        cfg.metrics_listen = Some(m);
    }
    let server = Server::start(&cfg, a.init).await?;
    let addr = server.local_addr()?;
    tracing::info!(event = "ready", listen = %addr, metrics = %ftvm_witness::metrics::describe(server.metrics_addr()), pairs = cfg.pairs.len(), store = cfg.store.kind(), data_dir = %cfg.data_dir.display());
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ftvm-witness ready listen={addr} metrics={}",
            ftvm_witness::metrics::describe(server.metrics_addr())
        )?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(event = "shutdown");
    server.shutdown().await;
    Ok(())
}

async fn client(a: &ClientArgs) -> anyhow::Result<WitnessSet> {
    let mut targets = Vec::new();
    for spec in &a.witness {
        targets.push(WitnessTarget::resolve(spec, &a.server_name).await?);
    }
    let id = ftvm_tls::Identity::load(&a.tls, &a.node)?;
    let opts = ClientOptions {
        server_name: a.server_name.clone(),
        attempt_timeout: Duration::from_millis(a.timeout_ms),
        attempts: a.attempts,
        ..ClientOptions::default()
    };
    Ok(WitnessSet::new(&targets, &id, opts)?)
}

async fn claim(a: ClaimArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.client).await?;
    let claim_id = match a.claim_id {
        Some(id) => id,
        None => {
            let id = ClaimId::random();
            eprintln!("ftvm-witness: claim id {id} (retry this claim with --claim-id {id})");
            id
        }
    };
    match c.claim(&a.client.pair, a.seen, claim_id).await? {
        ClaimOutcome::Granted { generation } => {
            println!("{generation}");
            Ok(ExitCode::SUCCESS)
        }
        ClaimOutcome::Denied { generation, holder } => {
            println!(
                "denied generation={generation} holder={}",
                holder.as_deref().unwrap_or("-")
            );
            Ok(ExitCode::from(EXIT_DENIED))
        }
    }
}

async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.client).await?;
    let s = c.status(&a.client.pair).await?;
    println!(
        "pair={} generation={} holder={}",
        a.client.pair,
        s.generation,
        s.holder.as_deref().unwrap_or("-")
    );
    Ok(ExitCode::SUCCESS)
}

fn certs(c: CertsCmd) -> anyhow::Result<()> {
    match c {
        CertsCmd::Init {
            dir,
            pair,
            nodes,
            witness_name,
            listen,
            force,
        } => {
            let toml_path = dir.join("witness.toml");
            if toml_path.exists() && !force {
                bail!(
                    "{} already exists; refusing to overwrite it (use --force)",
                    toml_path.display()
                );
            }
            let mut pairs = BTreeMap::new();
            pairs.insert(
                pair.clone(),
                PairConfig {
                    nodes: nodes.clone(),
                },
            );
            let cfg = Config {
                listen,
                data_dir: PathBuf::from("data"),
                tls_dir: PathBuf::from("."),
                identity: witness_name.clone(),
                metrics_listen: None,
                idle_timeout_ms: None,
                store: Default::default(),
                pairs,
            };
            cfg.validate().map_err(anyhow::Error::msg)?;
            let mut names: Vec<&str> = vec![witness_name.as_str()];
            names.extend(nodes.iter().map(String::as_str));
            let node = ftvm_tls::CertKind::node(&pair);
            let mut ids = vec![(witness_name.as_str(), ftvm_tls::CertKind::Witness)];
            ids.extend(nodes.iter().map(|n| (n.as_str(), node.clone())));
            ftvm_tls::init_dir_with(&dir, &ids, force)?;
            let text = format!(
                "# ftvm-witness configuration written by `ftvm-witness certs init`.\n\
                 # Relative paths are relative to this file. Add pairs as [pairs.NAME] sections.\n\
                 # Optional: metrics_listen = \"127.0.0.1:9400\" (Prometheus, plain HTTP).\n{}",
                cfg.to_toml()
            );
            write_new(&toml_path, &text)?;
            println!(
                "wrote CA, certificates for {} and {} in {}",
                names.join(", "),
                toml_path.display(),
                dir.display()
            );
            Ok(())
        }
        CertsCmd::Issue {
            dir,
            names,
            pair,
            witness,
            force,
        } => {
            let n: Vec<&str> = names.iter().map(String::as_str).collect();
            match (pair, witness) {
                (Some(p), _) => {
                    ftvm_tls::issue_with(&dir, &n, &ftvm_tls::CertKind::node(&p), force)?
                }
                (None, true) => {
                    ftvm_tls::issue_with(&dir, &n, &ftvm_tls::CertKind::Witness, force)?
                }
                (None, false) => {
                    ftvm_tls::issue(&dir, &n, force)?;
                    eprintln!(
                        "note: issued without --pair or --witness: these certificates are accepted \
                         by no node as a node (ftvm-resync, the logging channel)"
                    );
                }
            }
            println!(
                "issued certificates for {} in {}",
                n.join(", "),
                dir.display()
            );
            Ok(())
        }
    }
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
