//! What the datastore kinds share:
//!
//! - [`tool`]: where a kind's command-line tools are, running them, the tail of their stderr.
//! - [`tree`]: directory trees as tar streams, counted, unpacked beside a target and swapped in.
//! - [`leftovers`]: what an interrupted restore leaves beside its target, and how the agent
//!   puts it right.
//! - [`smoke`]: the operator's smoke checks of a restored datastore.

pub mod leftovers;
pub mod smoke;
pub mod tool;
pub mod tree;
