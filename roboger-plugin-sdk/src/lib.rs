//! The Roboger plugin SDK: everything a plugin executable and the server
//! share about the wire.
//!
//! Roboger plugins are separate executables that the server spawns and talks
//! to with JSON-RPC 2.0 over stdin/stdout. This crate owns the definitions
//! both sides use, so the protocol is written down exactly once:
//!
//! * [`protocol`]: wire types (event levels today; messages and the
//!   handshake as the protocol grows).
#![forbid(unsafe_code)]

pub mod protocol;
