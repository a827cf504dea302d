//! [`KubeHandler`]: a task's work as a Kubernetes Job, one Job per run,
//! named and fenced by the run's claim epoch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use eretes_protocol::{Namespace, TaskRecord};
use eretes_runtime::{boottime_ns, ErrorPolicy, StateContext, StatefulHandler, Step};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::images::AllowImages;
use crate::job::{build_job, JobIdentity, CONTAINER};
use crate::logs::{follow, LogTarget};
use crate::names::{
    job_name, selector, task_labels, EPOCH_LABEL, NODE_ANNOTATION, TASK_ID_ANNOTATION,
};
use crate::retry::{status_code, with_retries};
use crate::spec::KubeSpec;

/// How long a call that changes something (create, delete) keeps trying
/// through transient API failures before the run gives up on it.
const CALL_BUDGET: Duration = Duration::from_secs(60);
/// How long a stopped run waits for its Job to be gone, beyond the grace
/// period, before it gives the task back anyway (the next run of the task
/// deletes what is left before it starts its own).
const GONE_MARGIN: Duration = Duration::from_secs(30);
/// How long the end of a run waits for the log follower to write the rest.
const LOG_DRAIN: Duration = Duration::from_secs(5);
/// Errors of a Kubernetes task count for this long (its attempts are
/// counted over its whole life, as a process task's are).
const ATTEMPT_WINDOW: Duration = Duration::from_secs(31_557_600);

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
    /// The images that may run.
    pub allow_images: AllowImages,
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
}

#[async_trait]
impl StatefulHandler for KubeHandler {
    async fn run(&self, ctx: StateContext) -> Step {
        let spec = match KubeSpec::from_properties(&ctx.task.task.spec.properties) {
            Ok(spec) => spec,
            Err(error) => return Step::Fatal(error.to_string()),
        };
        if !self.config.allow_images.allows(&spec.image) {
            return Step::Fatal(format!(
                "image {:?} is not on this agent's --allow-images list",
                spec.image
            ));
        }
        let run = Run::new(&self.config, &ctx, &spec);
        Box::pin(run.drive(&ctx, &spec)).await
    }

    fn error_policy(&self, task: &TaskRecord) -> Option<ErrorPolicy> {
        let spec = KubeSpec::from_properties(&task.spec.properties).ok()?;
        let (first_backoff, longest_backoff) = self.config.retry_backoff;
        Some(ErrorPolicy {
            max_errors: spec.max_attempts as usize,
            window: ATTEMPT_WINDOW,
            first_backoff,
            longest_backoff,
        })
    }
}

/// What the watches have shown of the task's Jobs and pods.
#[derive(Default)]
struct Seen<K> {
    objects: BTreeMap<String, K>,
    /// Objects of a re-list in progress (between `Init` and `InitDone`).
    relisting: Option<BTreeMap<String, K>>,
    /// A full list has been seen.
    ready: bool,
}

impl<K: kube::Resource> Seen<K> {
    fn apply(&mut self, event: Event<K>) {
        let name = |object: &K| object.meta().name.clone().unwrap_or_default();
        match event {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name(&object), object);
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.ready = true;
            }
            Event::Apply(object) => {
                self.objects.insert(name(&object), object);
            }
            Event::Delete(object) => {
                self.objects.remove(&name(&object));
            }
        }
    }
}

/// One run: its Job's identity, the APIs, and what it has done so far.
struct Run {
    jobs: Api<Job>,
    pods: Api<Pod>,
    identity: JobIdentity,
    epoch: i64,
    grace: Duration,
    logs: LogTarget,
    tail_bytes: usize,
    attempt: u32,
}

/// How a run's Job ended, as its conditions and pod tell.
enum Finish {
    Succeeded,
    Failed(String),
}

impl Run {
    fn new(config: &KubeConfig, ctx: &StateContext, spec: &KubeSpec) -> Run {
        let task = &ctx.task;
        let namespace = spec
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let mut labels = task_labels(&config.namespace, &task.id);
        labels.insert(EPOCH_LABEL.into(), task.epoch.to_string());
        let attempt = u32::try_from(ctx.recent_errors).unwrap_or(u32::MAX - 1) + 1;
        let identity = JobIdentity {
            name: job_name(&config.namespace, &task.id, task.epoch),
            labels,
            annotations: BTreeMap::from([
                (TASK_ID_ANNOTATION.into(), task.id.to_string()),
                (NODE_ANNOTATION.into(), task.node.to_string()),
            ]),
            env: vec![
                ("ERETES_TASK_ID".into(), task.id.to_string()),
                ("ERETES_EPOCH".into(), task.epoch.to_string()),
                ("ERETES_NODE".into(), task.node.to_string()),
                ("ERETES_ATTEMPT".into(), attempt.to_string()),
            ],
            termination_grace_seconds: i64::try_from(config.stop_grace.as_secs())
                .unwrap_or(i64::MAX),
            namespace,
        };
        Run {
            jobs: Api::namespaced(config.client.clone(), &identity.namespace),
            pods: Api::namespaced(config.client.clone(), &identity.namespace),
            identity,
            epoch: task.epoch,
            grace: config.stop_grace,
            logs: LogTarget {
                dir: config.logs_dir.join(task.id.as_str()),
                reset: ctx.recent_errors == 0,
                cap: config.log_cap,
            },
            tail_bytes: config.tail_bytes,
            attempt,
        }
    }

    fn name(&self) -> &str {
        &self.identity.name
    }

    /// The run, from clearing older epochs to its Job's end or stop.
    async fn drive(self, ctx: &StateContext, spec: &KubeSpec) -> Step {
        let task = &ctx.task;
        let task_selector = {
            let mut labels = self.identity.labels.clone();
            labels.remove(EPOCH_LABEL);
            selector(&labels)
        };
        let config = watcher::Config::default().labels(&task_selector);
        let mut job_events =
            std::pin::pin!(watcher(self.jobs.clone(), config.clone()).default_backoff());
        let mut pod_events = std::pin::pin!(watcher(self.pods.clone(), config).default_backoff());
        let mut jobs: Seen<Job> = Seen::default();
        let mut pods: Seen<Pod> = Seen::default();
        let mut fence = task.fence.clone();
        let mut fence_at = fence.current();
        // Older Jobs this run asked to delete (each once per appearance).
        let mut deleting: BTreeMap<String, String> = BTreeMap::new();
        let mut created = false;
        let mut seen_mine = false;
        let (ended_sender, ended) = watch::channel(false);
        let mut follower: Option<tokio::task::JoinHandle<()>> = None;
        let stop_grace;
        loop {
            let fence_passed = async {
                match fence_at {
                    Some(deadline) => tokio::time::sleep_until(deadline.at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = job_events.next() => match event {
                    Some(Ok(event)) => jobs.apply(event),
                    Some(Err(error)) => warn!(task = %task.id, %error, "watching the task's Jobs failed; resuming"),
                    None => return Step::Error("the watch of the task's Jobs ended".into()),
                },
                event = pod_events.next() => match event {
                    Some(Ok(event)) => pods.apply(event),
                    Some(Err(error)) => warn!(task = %task.id, %error, "watching the task's pods failed; resuming"),
                    None => return Step::Error("the watch of the task's pods ended".into()),
                },
                _ = task.cancel.cancelled() => {
                    let fenced = fence_at.is_some_and(|d| boottime_ns() >= d.boottime_ns);
                    stop_grace = if fenced { Duration::ZERO } else { self.grace };
                    break;
                }
                at = fence.changed() => fence_at = at,
                () = fence_passed => {
                    // The lease may be gone: nothing of this run may go on.
                    warn!(task = %task.id, epoch = self.epoch, "the node's fencing deadline passed: deleting the task's Job");
                    stop_grace = Duration::ZERO;
                    break;
                }
            }
            if !jobs.ready {
                continue;
            }
            // A newer epoch owns the task: this run is stale.
            if let Some(newer) = jobs
                .objects
                .values()
                .find(|job| epoch_of(job) > Some(self.epoch))
            {
                warn!(task = %task.id, epoch = self.epoch, newer = ?newer.metadata.name, "a newer run of the task exists: this one stops");
                stop_grace = Duration::ZERO;
                break;
            }
            // Older epochs go first, and any that appear later too.
            for (name, job) in &jobs.objects {
                let older = epoch_of(job).is_none_or(|epoch| epoch < self.epoch);
                let uid = job.metadata.uid.clone().unwrap_or_default();
                if older && deleting.get(name) != Some(&uid) && !is_deleting(job) {
                    info!(task = %task.id, job = name, "deleting a Job of an older run");
                    self.delete(name, self.grace).await;
                    deleting.insert(name.clone(), uid);
                }
            }
            let mine = jobs.objects.get(self.name());
            if !created {
                match mine {
                    // This epoch's Job from an earlier attempt (a retry,
                    // a resume): it must be gone before a new one starts.
                    Some(job) if is_finished(job) || is_deleting(job) => {
                        if !is_deleting(job) {
                            self.delete(self.name(), Duration::ZERO).await;
                        }
                        continue;
                    }
                    // Created by this epoch before (an answer that was
                    // lost, a stop whose delete failed): carried on.
                    Some(_) => {
                        created = true;
                    }
                    None => {
                        let others = jobs.objects.len();
                        if others > 0 {
                            continue;
                        }
                        match self.create(spec).await {
                            Ok(()) => created = true,
                            Err(error) => return Step::Error(error),
                        }
                        continue;
                    }
                }
            }
            let Some(job) = jobs.objects.get(self.name()) else {
                if seen_mine {
                    return Step::Fatal(format!(
                        "Kubernetes Job {}/{} was deleted by someone else",
                        self.identity.namespace,
                        self.name()
                    ));
                }
                continue;
            };
            seen_mine = true;
            if is_deleting(job) && !is_finished(job) {
                // Being deleted, and not by this run (which would have left
                // the loop): the end is the same as an outright delete.
                return Step::Fatal(format!(
                    "Kubernetes Job {}/{} was deleted by someone else",
                    self.identity.namespace,
                    self.name()
                ));
            }
            let pod = pods
                .objects
                .values()
                .filter(|pod| pod_job(pod) == Some(self.name()))
                .max_by_key(|pod| pod.metadata.creation_timestamp.clone())
                .cloned();
            if follower.is_none() {
                if let Some(pod) = pod.as_ref().filter(|pod| has_started(pod)) {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    follower = Some(tokio::spawn(follow(
                        self.pods.clone(),
                        name,
                        self.logs.clone(),
                        ended.clone(),
                    )));
                }
            }
            let Some(finish) = finish_of(job) else {
                continue;
            };
            let _ = ended_sender.send(true);
            if let Some(follower) = follower.take() {
                let _ = tokio::time::timeout(LOG_DRAIN, follower).await;
            }
            let step = self.step(finish, pod.as_ref()).await;
            // The result is read; the Job and its pod go (the task's next
            // run, if any, makes its own).
            self.delete(self.name(), Duration::ZERO).await;
            return step;
        }
        // Stopped: delete this run's Job and wait until it is gone.
        let _ = ended_sender.send(true);
        if let Some(follower) = follower.take() {
            follower.abort();
        }
        if created || jobs.objects.contains_key(self.name()) {
            self.delete(self.name(), stop_grace).await;
            let bound = Instant::now() + stop_grace + GONE_MARGIN;
            while jobs.objects.contains_key(self.name()) || !jobs.ready {
                tokio::select! {
                    event = job_events.next() => match event {
                        Some(Ok(event)) => jobs.apply(event),
                        Some(Err(error)) => warn!(task = %task.id, %error, "watching the task's Jobs failed; resuming"),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(bound) => {
                        warn!(task = %task.id, job = self.name(), "the stopped run's Job is not gone yet; the next run of the task deletes it");
                        break;
                    }
                }
            }
        }
        Step::Release
    }

    /// Create this run's Job; one that exists already (a create whose
    /// answer was lost) is this run's.
    async fn create(&self, spec: &KubeSpec) -> Result<(), String> {
        let job = build_job(spec, &self.identity);
        let params = PostParams::default();
        let answer = with_retries("creating the Job", CALL_BUDGET, || {
            self.jobs.create(&params, &job)
        })
        .await;
        match answer {
            Ok(_) => {
                info!(job = self.name(), namespace = %self.identity.namespace, "created the Job");
                Ok(())
            }
            Err(error) if status_code(&error) == Some(409) => Ok(()),
            Err(error) => Err(format!(
                "cannot create Kubernetes Job {}/{}: {error} (attempt {})",
                self.identity.namespace,
                self.name(),
                self.attempt
            )),
        }
    }

    /// Delete Job `name` and its pods (foreground: the pods first). Their
    /// containers get the pod's termination grace (the stop grace), or
    /// none when `grace` is zero: then the pods are deleted directly too,
    /// since a Job's delete does not pass its grace on to them. A Job
    /// already gone is fine; a delete that keeps failing is logged, and the
    /// next decision tries again.
    async fn delete(&self, name: &str, grace: Duration) {
        let seconds = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
        let params = DeleteParams::foreground().grace_period(seconds);
        let answer = with_retries("deleting a Job", CALL_BUDGET, || {
            self.jobs.delete(name, &params)
        })
        .await;
        match answer {
            Ok(_) => {}
            Err(error) if status_code(&error) == Some(404) => {}
            Err(error) => warn!(job = name, %error, "cannot delete the Job"),
        }
        if seconds == 0 {
            self.delete_pods_now(name).await;
        }
    }

    /// Delete the pods of Job `name` with no grace.
    async fn delete_pods_now(&self, name: &str) {
        let list = ListParams::default().labels(&format!("job-name={name}"));
        let pods = match with_retries("listing a Job's pods", CALL_BUDGET, || {
            self.pods.list(&list)
        })
        .await
        {
            Ok(pods) => pods,
            Err(error) => {
                warn!(job = name, %error, "cannot list the Job's pods");
                return;
            }
        };
        let params = DeleteParams::background().grace_period(0);
        for pod in pods {
            let Some(pod) = pod.metadata.name else {
                continue;
            };
            match with_retries("deleting a pod", CALL_BUDGET, || {
                self.pods.delete(&pod, &params)
            })
            .await
            {
                Ok(_) => {}
                Err(error) if status_code(&error) == Some(404) => {}
                Err(error) => warn!(pod, %error, "cannot delete the pod"),
            }
        }
    }

    /// The task's step for its Job's `finish`, with the pod's exit code and
    /// the end of its log.
    async fn step(&self, finish: Finish, watched: Option<&Pod>) -> Step {
        // The pod's watch may lag the Job's: its end is read from the API
        // when the watched pod does not show it yet.
        let fresh = match watched.and_then(exit_code) {
            Some(_) => None,
            None => self.latest_pod().await,
        };
        let pod = fresh.as_ref().or(watched);
        let exit_code = pod.and_then(exit_code);
        let tail = match pod.and_then(|pod| pod.metadata.name.clone()) {
            Some(name) => self.log_tail(&name).await,
            None => String::new(),
        };
        match finish {
            Finish::Succeeded => Step::Complete(json!({
                "exit_code": exit_code.unwrap_or(0),
                "attempts": self.attempt,
                "job": self.name(),
                "namespace": self.identity.namespace,
                "log_tail": tail,
            })),
            Finish::Failed(reason) => Step::Error(format!(
                "Kubernetes Job {}/{} failed: {reason}{} (attempt {}); the log ends with: {tail:?}",
                self.identity.namespace,
                self.name(),
                exit_code.map_or_else(String::new, |code| format!(", exit code {code}")),
                self.attempt
            )),
        }
    }

    /// The newest pod of this run's Job, read from the API.
    async fn latest_pod(&self) -> Option<Pod> {
        let list = ListParams::default().labels(&format!("job-name={}", self.name()));
        let pods = with_retries("listing the Job's pods", Duration::from_secs(10), || {
            self.pods.list(&list)
        })
        .await
        .ok()?;
        pods.items
            .into_iter()
            .max_by_key(|pod| pod.metadata.creation_timestamp.clone())
    }

    /// The last lines of the pod's log, at most `tail_bytes` of them.
    async fn log_tail(&self, pod: &str) -> String {
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(20),
            limit_bytes: Some(i64::try_from(self.tail_bytes).unwrap_or(i64::MAX)),
            ..LogParams::default()
        };
        match with_retries("reading the pod's log", Duration::from_secs(10), || {
            self.pods.logs(pod, &params)
        })
        .await
        {
            Ok(log) => tail_of(&log, self.tail_bytes),
            Err(error) => {
                warn!(pod, %error, "cannot read the end of the pod's log");
                String::new()
            }
        }
    }
}

/// The epoch a Job of the task was made for, from its label.
fn epoch_of(job: &Job) -> Option<i64> {
    job.metadata.labels.as_ref()?.get(EPOCH_LABEL)?.parse().ok()
}

fn is_deleting(job: &Job) -> bool {
    job.metadata.deletion_timestamp.is_some()
}

fn is_finished(job: &Job) -> bool {
    finish_of(job).is_some()
}

/// How a Job ended, if it did: a `Complete` or `Failed` condition that holds.
fn finish_of(job: &Job) -> Option<Finish> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .filter(|condition| condition.status == "True")
        .find_map(|condition| match condition.type_.as_str() {
            "Complete" => Some(Finish::Succeeded),
            "Failed" => Some(Finish::Failed(match condition.reason.as_deref() {
                Some("DeadlineExceeded") => {
                    let limit = job
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.active_deadline_seconds)
                        .unwrap_or_default();
                    format!("it ran past its active deadline of {limit}s")
                }
                Some(reason) => match condition.message.as_deref() {
                    Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                    _ => reason.to_string(),
                },
                None => "failed".into(),
            })),
            _ => None,
        })
}

/// The Job a pod belongs to.
fn pod_job(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get("job-name")
        .map(String::as_str)
}

/// Whether the pod's container has started (so its log can be read).
fn has_started(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Running" | "Succeeded" | "Failed"))
}

/// The exit code of the pod's container `main`, once it has terminated.
fn exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|status| status.name == CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|terminated| terminated.exit_code)
}

/// At most the last `bytes` of `log`, cut at a character boundary.
fn tail_of(log: &str, bytes: usize) -> String {
    let mut start = log.len().saturating_sub(bytes);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}
