//! `ftvm-soak`: seeded randomised fault injection against the FT pair, with a checker of
//! acknowledged writes, stale reads and split brain (docs/testing.md).
//!
//! ```text
//! ftvm-soak [--trials N] [--minutes M] [--seed S] [--faults K] [--clients C]
//!           [--reply-timeout-ms T] [--heal-limit-s H] [--out DIR] [--keep] [--verbose]
//!           [--no-operator]
//! ```
//!
//! Trial `i` (from 0) uses seed `S + i`, so `--trials 1 --seed S+i` repeats it. Needs root,
//! iproute2, /dev/kvm and the workspace's release binaries beside this one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ftvm_tests::soak::trial::{run_trial, TrialConfig};
use ftvm_tests::soak::Totals;

const USAGE: &str = "usage: ftvm-soak [--trials N] [--minutes M] [--seed S] [--faults K] \
[--clients C] [--reply-timeout-ms T] [--heal-limit-s H] [--out DIR] [--keep] [--verbose]
[--no-operator]

  --trials N          trials to run (default 1, or as many as fit in --minutes)
  --minutes M         start no trial, and no step of a trial, after M minutes
  --seed S            seed of the first trial (trial i uses S+i; default: from the clock)
  --faults K          faults per trial (default 6)
  --clients C         client connections (default 3)
  --reply-timeout-ms  how long a client waits for a reply (default 10000)
  --heal-limit-s H    how long a heal may take before the trial fails (default 90)
  --out DIR           where failing trials are recorded (default target/ftvm-soak)
  --keep              record every trial, not only the failing ones
  --verbose           print every event as it happens
  --no-operator       never act as the operator (a backup refused because its disk
                      differs is otherwise brought in line with ftvm-resync, and counted)

The last line of the output is
  soak: trials=N faults=F acked=A lost=L stale_reads=S dual_primary=D client_errors=E
Exit status: 0 all well; 1 lost, stale_reads or dual_primary not 0; 3 a trial could not
complete (the pair did not heal, or the lab failed); 2 bad usage.";

struct Args {
    trials: Option<u64>,
    minutes: Option<f64>,
    seed: u64,
    faults: usize,
    clients: usize,
    reply_timeout: Duration,
    heal_limit: Duration,
    out: PathBuf,
    keep: bool,
    verbose: bool,
    operator: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        trials: None,
        minutes: None,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
        faults: 6,
        clients: 3,
        reply_timeout: Duration::from_secs(10),
        heal_limit: Duration::from_secs(90),
        out: PathBuf::from("target/ftvm-soak"),
        keep: false,
        verbose: false,
        operator: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
        }
        match flag.as_str() {
            "--trials" => a.trials = Some(num(&flag, value()?)?),
            "--minutes" => a.minutes = Some(num(&flag, value()?)?),
            "--seed" => a.seed = num(&flag, value()?)?,
            "--faults" => a.faults = num(&flag, value()?)?,
            "--clients" => a.clients = num(&flag, value()?)?,
            "--reply-timeout-ms" => a.reply_timeout = Duration::from_millis(num(&flag, value()?)?),
            "--heal-limit-s" => a.heal_limit = Duration::from_secs(num(&flag, value()?)?),
            "--out" => a.out = PathBuf::from(value()?),
            "--keep" => a.keep = true,
            "--no-operator" => a.operator = false,
            "--verbose" | "-v" => a.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.clients == 0 || a.faults == 0 {
        return Err("--clients and --faults must be at least 1".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ftvm-soak: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let deadline = a.minutes.map(|m| start + Duration::from_secs_f64(m * 60.0));
    let trials = a
        .trials
        .unwrap_or(if a.minutes.is_some() { u64::MAX } else { 1 });
    println!(
        "soak: seed {} (trial i uses seed {}+i), {} faults per trial, {} clients{}{}",
        a.seed,
        a.seed,
        a.faults,
        a.clients,
        if trials == u64::MAX {
            String::new()
        } else {
            format!(", {trials} trials")
        },
        a.minutes
            .map(|m| format!(", for at most {m} minutes"))
            .unwrap_or_default()
    );
    let mut totals = Totals::default();
    for i in 0..trials {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let cfg = TrialConfig {
            seed: a.seed.wrapping_add(i),
            faults: a.faults,
            clients: a.clients,
            reply_timeout: a.reply_timeout,
            heal_limit: a.heal_limit,
            out_dir: a.out.clone(),
            keep: a.keep,
            deadline,
            verbose: a.verbose,
            operator: a.operator,
        };
        let r = run_trial(&cfg);
        let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
        for e in &r.client_errors {
            *kinds.entry(&e.kind).or_default() += 1;
        }
        println!(
            "soak: trial {} seed={} steps={} faults={} ops={} acked={} lost={} stale={} dual={}{} client_errors={}{} gap={:.0}ms heal_max={:.1}s exits={} resyncs={} {:.0}s {}{}",
            i + 1,
            r.seed,
            r.steps,
            r.faults,
            r.ops,
            r.acked,
            r.lost.len(),
            r.stale.len(),
            r.dual.len(),
            if r.dual_window > 0 {
                format!(" ({} in the documented window)", r.dual_window)
            } else {
                String::new()
            },
            r.client_errors.len(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" {kinds:?}")
            },
            r.gap.ns as f64 / 1e6,
            r.heal_max.as_secs_f64(),
            r.exits.values().sum::<usize>(),
            r.resyncs.len(),
            r.elapsed.as_secs_f64(),
            if r.ok() { "ok" } else { "FAILED" },
            r.saved
                .as_ref()
                .map(|p| format!(" record: {}", p.display()))
                .unwrap_or_default()
        );
        for l in r
            .lost
            .iter()
            .chain(&r.stale)
            .chain(&r.dual)
            .chain(&r.malformed)
            .take(10)
        {
            println!("soak:   {l}");
        }
        if let Some(f) = &r.failure {
            println!("soak:   {}", f.lines().next().unwrap_or_default());
        }
        totals.add(&r);
    }
    println!("{}", totals.summary());
    ExitCode::from(totals.exit_code() as u8)
}
