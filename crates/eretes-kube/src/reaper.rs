//! [`Reaper`]: deletes the Jobs that no run of their task will delete.
//!
//! A run deletes its Job when it ends or stops, and the task's next run
//! deletes older epochs' Jobs. What neither reaches is a Job whose task has
//! ended or been removed while its delete could not be made: the API was
//! down when a kill or `rm` stopped the run, or the agent died right after
//! the task was killed. The reaper lists the eretes namespace's Jobs and
//! deletes each whose task is gone or ended. A task that still exists is
//! left to its runs (a sleeping or paused task's run may be about to make
//! its Job, which a reaper reading an older state must not delete).

use std::time::Duration;

use eretes_protocol::{Coordinator, TaskId};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams};
use kube::Api;
use tracing::{info, warn};

use crate::handler::KubeConfig;
use crate::names::{namespace_labels, selector, TASK_ID_ANNOTATION};
use crate::retry::with_retries;

/// How often the agent sweeps.
pub const REAP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes the Jobs of ended and removed tasks.
pub struct Reaper {
    client: kube::Client,
    selector: String,
    namespaces: Vec<String>,
    grace_seconds: u32,
}

impl Reaper {
    /// A reaper of the Jobs a handler with `config` makes.
    pub fn new(config: &KubeConfig) -> Reaper {
        Reaper {
            client: config.client.clone(),
            selector: selector(&namespace_labels(&config.namespace)),
            namespaces: config.namespaces(),
            grace_seconds: u32::try_from(config.stop_grace.as_secs())
                .unwrap_or(u32::MAX)
                .max(1),
        }
    }

    /// One sweep: the number of Jobs deleted. Jobs whose task cannot be
    /// read (the store is down) are left for the next sweep.
    pub async fn sweep(&self, coordinator: &Coordinator) -> usize {
        let mut deleted = 0;
        for namespace in &self.namespaces {
            let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
            let list = ListParams::default().labels(&self.selector);
            let listed = with_retries(
                "listing eretes Jobs",
                Duration::from_secs(30),
                || false,
                || jobs.list(&list),
            )
            .await;
            let listed = match listed {
                Ok(listed) => listed,
                Err(error) => {
                    warn!(namespace, %error, "cannot list eretes Jobs to sweep");
                    continue;
                }
            };
            for job in listed.items {
                let (Some(name), Some(task)) = (
                    job.metadata.name.as_deref(),
                    job.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(TASK_ID_ANNOTATION))
                        .and_then(|id| TaskId::new(id).ok()),
                ) else {
                    continue;
                };
                let ended = match coordinator.task_view(&task).await {
                    Ok(None) => true,
                    Ok(Some(view)) => view.state.is_terminal(),
                    Err(_) => false,
                };
                if !ended || job.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let params = DeleteParams::foreground().grace_period(self.grace_seconds);
                let answer = with_retries(
                    "deleting an ended task's Job",
                    Duration::from_secs(30),
                    || false,
                    || jobs.delete(name, &params),
                )
                .await;
                match answer {
                    Ok(_) => {
                        info!(namespace, job = name, %task, "deleted the Job of an ended or removed task");
                        deleted += 1;
                    }
                    Err(error) => {
                        warn!(namespace, job = name, %error, "cannot delete an ended task's Job")
                    }
                }
            }
        }
        deleted
    }
}
