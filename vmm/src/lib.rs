//! The ftvm VMM: runs a ring-3 guest under KVM, one vCPU, devices over MMIO, with every
//! nondeterministic input entering at numbered epoch boundaries (DESIGN §3) so that a run can
//! be recorded and replayed.

pub mod bus;
pub mod channel;
pub mod console;
pub mod devices;
pub mod epoch;
pub mod error;
pub mod guests;
pub mod join;
pub mod kvm;
pub mod live;
pub mod machine;
pub mod node;
pub mod plan;
pub mod replay;
pub mod setup;
pub mod signals;
pub mod solo;
pub mod spec;
pub mod state;

pub use error::VmmError;
