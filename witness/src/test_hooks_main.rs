//! `ftvm-witness-test-hooks`: the witness service with fault-injection hooks, for the crate's
//! own tests only. Built only with the `test-hooks` cargo feature (which only the tests
//! enable); the `ftvm-witness` binary users run contains no hook at all, whatever its features.
//!
//! `ftvm-witness-test-hooks serve --config FILE [--listen ADDR] [--metrics ADDR] [--init]`
//! behaves as `ftvm-witness serve`, plus:
//!
//! * `FTVM_WITNESS_TEST_CRASH_AFTER_WRITE` set: the process kills itself (SIGKILL) right after
//!   its first durable write of a grant and before any reply, to prove that a crash there
//!   loses only the reply.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ftvm_witness::backend::{Commit, StateStore, Versioned};
use ftvm_witness::state::PairState;
use ftvm_witness::store::StoreError;
use ftvm_witness::{Config, Server};

/// The variable that arms the crash hook.
const CRASH_AFTER_WRITE_ENV: &str = "FTVM_WITNESS_TEST_CRASH_AFTER_WRITE";

#[derive(Parser)]
#[command(
    name = "ftvm-witness-test-hooks",
    about = "ftvm-witness serve with test hooks (tests only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the witness service (as `ftvm-witness serve`).
    Serve {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Override the listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Turn on the metrics listener.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Create the store.
        #[arg(long)]
        init: bool,
    },
}

/// A store that kills the process after its first durable write of a grant.
struct CrashAfterWrite(Box<dyn StateStore>);

impl StateStore for CrashAfterWrite {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn shared(&self) -> bool {
        self.0.shared()
    }
    fn max_batch(&self) -> usize {
        self.0.max_batch()
    }
    fn load(&mut self) -> Result<BTreeMap<String, Versioned>, StoreError> {
        self.0.load()
    }
    fn commit(
        &mut self,
        expect: &[(String, u64)],
        writes: &[(String, PairState)],
    ) -> Result<Commit, StoreError> {
        let r = self.0.commit(expect, writes)?;
        if matches!(&r, Commit::Done(_)) && !writes.is_empty() {
            tracing::error!(
                event = "test_crash",
                "crashing after the write, before the reply ({CRASH_AFTER_WRITE_ENV})"
            );
            // SIGKILL, like `kill -9`: no destructor, no core file.
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Ok(r)
    }
    fn reset_key(&mut self) -> Result<Vec<u8>, StoreError> {
        self.0.reset_key()
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Cmd::Serve {
        config,
        listen,
        metrics,
        init,
    } = Cli::parse().cmd;
    let mut cfg = Config::load(&config)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if metrics.is_some() {
        cfg.metrics_listen = metrics;
    }
    let crash = std::env::var_os(CRASH_AFTER_WRITE_ENV).is_some();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(async {
            let (store, data_dir) = (cfg.store.clone(), cfg.data_dir.clone());
            let server = Server::start_with(
                &cfg,
                Box::new(move || {
                    let s = ftvm_witness::backend::open(&store, &data_dir, init)?;
                    Ok(if crash {
                        Box::new(CrashAfterWrite(s)) as Box<dyn StateStore>
                    } else {
                        s
                    })
                }),
            )
            .await?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "ftvm-witness ready listen={} metrics={}",
                server.local_addr()?,
                ftvm_witness::metrics::describe(server.metrics_addr())
            )?;
            out.flush()?;
            drop(out);
            tokio::signal::ctrl_c().await?;
            server.shutdown().await;
            anyhow::Ok(())
        })
}
