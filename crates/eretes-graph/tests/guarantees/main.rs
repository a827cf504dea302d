//! The graph layer's promises, each checked by a small job kind written here
//! that records what its tasks observe, on in-process nodes of one embedded
//! store with real gRPC between them on loopback.
//!
//! Every wait has a deadline ([`DEADLINE`]); the lease TTL is 1 s, so a
//! killed node's tasks move within about a second. Kills are the driver's:
//! `node.kill(); graph.stop();` (the process died). Each test that kills
//! starts one more node than the job has tasks, each node with one slot, so
//! every task runs on its own node and the spare takes a killed task over.
//!
//! The last three tests were written against two bugs and one questionable
//! behaviour this suite found (a late callback's `inc_epoch` skipping an
//! epoch, an answer sent after its epoch ended, `neighbour_restarted` for a
//! neighbour's first run); they hold since the fixes.

mod backups;
mod backups_review;
mod counter;
mod data;
mod epochs;
mod input;
mod meta;
mod neighbours;
mod review_found;
mod support;
