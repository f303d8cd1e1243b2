//! The witness: the arbiter that decides which node of an FT pair may run alone.
//!
//! Layers, from the inside out:
//! * [`state`] — the rule as a pure state machine (claim/status, a grant repeated only for the
//!   exact claim — node and claim id — it answered);
//! * [`codec`] — the compact, versioned request/response wire format;
//! * [`store`] — durable state in rocksdb, every grant synced before its reply;
//! * [`backend`] — the stores behind one trait: rocksdb (one witness) or [`etcd`] (feature
//!   `etcd`: a cluster several witnesses share, each claim one transaction);
//! * [`server`] — the QUIC + mutual-TLS service with pair authorization by certificate;
//! * [`client`] — [`WitnessClient`] (one witness) and [`WitnessSet`] (several witnesses of one
//!   shared store, tried in turn), used by `ftvm-node` and the CLI;
//! * [`config`], [`metrics`] — the TOML configuration and Prometheus metrics.

#![deny(missing_docs)]

pub mod backend;
pub mod client;
pub mod codec;
pub mod config;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod metrics;
pub mod server;
pub mod state;
pub mod store;

pub use client::{
    ClaimOutcome, ClientOptions, PairStatus, WitnessClient, WitnessError, WitnessSet, WitnessTarget,
};
pub use config::Config;
pub use server::Server;
pub use state::ClaimId;
