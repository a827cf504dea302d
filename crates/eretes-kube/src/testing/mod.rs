//! Test support: a fake Kubernetes API server (see [`fake_api`]) that the
//! real `kube` client runs against.

pub mod fake_api;

mod controller;
mod deletion;
mod http;
mod kubelet;
mod logs;
mod selector;
mod status;
mod store;
mod validation;

pub use fake_api::{
    FakeApiServer, JobEvent, JobEventKind, PodScript, Propagation, MAX_SIMULATED_GRACE,
};
