//! A member of an FT pair (`ftvm-node run --config node.toml`): configuration, the persisted
//! generation, the cold-start and claim rules as pure functions ([`rules`]), the backup's
//! input source with go-live ([`follow`]), status and metrics ([`status`]), and the
//! orchestration that ties them to the VM, the channel and the witness ([`run`]).

pub mod config;
pub mod follow;
pub mod garp;
pub mod generation;
pub mod join;
pub mod priority;
pub mod rules;
pub mod run;
pub mod status;
