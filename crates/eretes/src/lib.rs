//! # eretes — the agent's client library
//!
//! The `eretes` package is the agent and CLI binary (layer 6 of the
//! design); this library is what a program uses to talk to an agent the way
//! the CLI does: [`AgentClient`] submits process tasks, shows, lists and
//! waits for them, reads their logs, and sends task and node commands over
//! the agent's HTTP API, with typed views ([`eretes_protocol::TaskView`])
//! and typed errors ([`ClientError`]).
//!
//! ```no_run
//! use eretes::{AgentClient, Submit};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let agent = AgentClient::new("http://127.0.0.1:7070", std::env::var("ERETES_TOKEN").ok())?;
//! let mut backup = Submit::new("tar", vec!["czf".into(), "/tmp/etc.tgz".into(), "/etc".into()]);
//! backup.id = Some("nightly-backup".into());
//! backup.spec.timeout_ms = Some(3_600_000);
//! let submitted = agent.submit(&backup).await?;
//! let ended = agent.wait(submitted.id.as_str()).await?;
//! println!("{} ended {:?}: {:?}", ended.id, ended.state, ended.result);
//! # Ok::<(), eretes::ClientError>(())
//! # });
//! ```

pub mod api_client;

pub use api_client::{AgentClient, ClientError, Command, NodeAction, Output, Queued, Submit};
