//! Test harness shared by the end-to-end tests: network namespaces that stand in for hosts
//! ([`netns`]), the pair lab ([`pair`]), running nodes ([`node`]), the history checker
//! ([`checker`]) and the fault-injection soak ([`soak`], the `ftvm-soak` binary).

pub mod capture;
pub mod checker;
pub mod netns;
pub mod node;
pub mod pair;
pub mod soak;
