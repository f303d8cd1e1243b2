//! Joining a running primary (DESIGN §5 "Cold start and joining"): the pieces that do not
//! depend on the node — tracking the disk blocks the guest writes while the copy runs
//! ([`blocks`]), the encoding of block batches, and when pre-copy stops iterating
//! ([`rounds`], a pure policy). The node's side of the protocol (which messages, in which
//! order, the commit point) is in `node::join`.

pub mod blocks;
pub mod rounds;
