//! Test harness shared by the end-to-end tests: network namespaces that stand in for hosts
//! ([`netns`]), and (later) locating the built binaries.

pub mod checker;
pub mod netns;
pub mod node;
pub mod pair;
