//! The Roboger plugin SDK: everything a plugin executable and the server
//! share about the wire.
//!
//! Roboger plugins are separate executables that the server spawns and talks
//! to with JSON-RPC 2.0 over stdin/stdout. This crate owns the definitions
//! both sides use, so the protocol is written down exactly once:
//!
//! * [`protocol`]: wire types, the handshake manifest, and each
//!   direction's methods as `#[rpc(server, client)]` traits;
//! * [`rpc`]: the [`rpc::Peer`] that runs JSON-RPC both ways over one
//!   pair of streams;
//! * [`plugin`]: the [`Plugin`] trait and [`run`], all a plugin needs;
//! * [`progress`]: what a plugin remembers of a delivery part-way
//!   through, so a retry does only what is left.
//!
//! # A complete plugin
//!
//! ```no_run
//! use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
//!
//! struct Echo;
//!
//! #[roboger_plugin_sdk::async_trait]
//! impl Plugin for Echo {
//!     fn info(&self) -> Info {
//!         Info { name: "echo", version: "1.0.0", description: "logs every event", ..Default::default() }
//!     }
//!
//!     async fn send(&self, event: Event, _host: &Host) -> Result<(), PluginError> {
//!         tracing::info!("{}: {}", event.formatted_subject, event.msg);
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     run(Echo)
//! }
//! ```
#![deny(unsafe_code)]

#[cfg(feature = "mimalloc")]
pub mod allocator;
#[cfg(feature = "http")]
pub mod egress;
#[cfg(feature = "http")]
pub mod http;
pub mod markup;
pub mod plugin;
pub mod progress;
pub mod protocol;
pub mod rpc;
#[cfg(feature = "schema")]
pub mod schema;
pub mod secret;

pub use async_trait::async_trait;
pub use plugin::{Event, Host, HttpRequest, Info, Plugin, PluginError, run, serve};
pub use protocol::{HttpResponse, Level};
