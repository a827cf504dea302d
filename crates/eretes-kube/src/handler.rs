//! [`KubeHandler`]: a task's work as a Kubernetes Job, one Job per run,
//! named and fenced by the run's claim epoch.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::{Namespace, TaskRecord};
use eretes_runtime::{ErrorPolicy, StateContext, StatefulHandler, Step};

use crate::images::AllowImages;
use crate::run::Run;
use crate::spec::{images, KubeSpec};
/// What a [`KubeHandler`] needs: the API, where Jobs go, which images may
/// run, and how to stop them.
#[derive(Clone)]
pub struct KubeConfig {
    /// The Kubernetes API (in-cluster config or a kubeconfig).
    pub client: kube::Client,
    /// The eretes namespace the agent serves (part of every Job's name and
    /// labels, so two eretes namespaces can share a Kubernetes one).
    pub namespace: Namespace,
    /// The Kubernetes namespace of Jobs whose spec names none.
    pub default_namespace: String,
    /// The images that may run (every container's, init containers' too).
    pub allow_images: AllowImages,
    /// Kubernetes namespaces a spec may name besides `default_namespace`.
    pub allow_namespaces: Vec<String>,
    /// Service accounts a spec may name (none: the namespace's default
    /// account only).
    pub allow_service_accounts: Vec<String>,
    /// The grace period of a Job's pod when a run is stopped (a pause,
    /// sleep, kill, release or drain); lease loss deletes with none.
    pub stop_grace: Duration,
    /// Where task logs go (`<dir>/<task>/stdout.log`).
    pub logs_dir: PathBuf,
    /// A task's log rotates at this size.
    pub log_cap: u64,
    /// The result keeps at most this many bytes of the log's end.
    pub tail_bytes: usize,
    /// The error policy's backoff (first, longest).
    pub retry_backoff: (Duration, Duration),
}

impl KubeConfig {
    /// The Kubernetes namespaces Jobs may be in: the default one and the
    /// allowed ones.
    pub fn namespaces(&self) -> Vec<String> {
        let mut namespaces = vec![self.default_namespace.clone()];
        namespaces.extend(self.allow_namespaces.iter().cloned());
        namespaces.sort();
        namespaces.dedup();
        namespaces
    }
}

/// Runs each task's [`KubeSpec`] as a Kubernetes Job, as the work of a task
/// state machine (wrap it in [`eretes_runtime::StateMachine`]).
///
/// * **One epoch at a time.** Before it creates its Job, a run deletes
///   every Job of the task from an older epoch (foreground propagation, so
///   their pods go first) and waits until they are gone; while its Job
///   runs, it deletes any older-epoch Job that appears (an owner that was
///   frozen and woke up), and a run that sees a newer epoch's Job stops
///   and gives the task back. The Job's name is a function of the task and
///   the epoch, so a create whose answer was lost is found again (409),
///   never made twice.
/// * **Lifecycle.** The Job and its pod are watched (one watch each, by the
///   task's labels, resumed and re-listed by `kube`'s watcher after a 410);
///   completion is the result, with the container's exit code and the
///   log's end; a failure (non-zero exit, the active deadline) is an error
///   for the state machine's retries; a Job deleted by someone else fails
///   the task, naming that.
/// * **Stopping.** A pause, sleep, kill, release or drain deletes the Job
///   with [`KubeConfig::stop_grace`], and lease loss with none, and waits
///   until it is gone. A finished Job is deleted once its result is read.
/// * **Logs.** The pod's log is followed into the task's log file.
/// * Jobs do not checkpoint: each run starts from the image.
pub struct KubeHandler {
    config: KubeConfig,
}

impl KubeHandler {
    /// A handler with `config`.
    pub fn new(config: KubeConfig) -> Self {
        KubeHandler { config }
    }

    /// What this agent refuses to run of `spec`: an image off its list (any
    /// container's), a namespace or service account it does not allow.
    fn check(&self, spec: &KubeSpec) -> Result<(), String> {
        if let Some(image) = images(spec)
            .into_iter()
            .find(|image| !self.config.allow_images.allows(image))
        {
            return Err(format!(
                "image {image:?} is not on this agent's --allow-images list"
            ));
        }
        if let Some(namespace) = &spec.namespace {
            if *namespace != self.config.default_namespace
                && !self.config.allow_namespaces.contains(namespace)
            {
                return Err(format!(
                    "Kubernetes namespace {namespace:?} is not this agent's ({:?}) nor on its --allow-kubernetes-namespaces list",
                    self.config.default_namespace
                ));
            }
        }
        if let Some(account) = &spec.service_account {
            if !self.config.allow_service_accounts.contains(account) {
                return Err(format!(
                    "service account {account:?} is not on this agent's --allow-service-accounts list"
                ));
            }
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &KubeConfig {
        &self.config
    }
}

#[async_trait]
impl StatefulHandler for KubeHandler {
    async fn run(&self, ctx: StateContext) -> Step {
        let spec = match KubeSpec::from_properties(&ctx.task.task.spec.properties.value()) {
            Ok(spec) => spec,
            Err(error) => return Step::Fatal(error.to_string()),
        };
        if let Err(refusal) = self.check(&spec) {
            return Step::Fatal(refusal);
        }
        let run = Run::new(&self.config, &ctx, &spec);
        Box::pin(run.drive(&ctx, &spec)).await
    }

    fn error_policy(&self, task: &TaskRecord) -> Option<ErrorPolicy> {
        let spec = KubeSpec::from_properties(&task.spec.properties.value()).ok()?;
        Some(ErrorPolicy::attempts(
            spec.max_attempts,
            self.config.retry_backoff,
        ))
    }
}
