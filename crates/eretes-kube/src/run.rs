//! One run of a Kubernetes task: clear the task's older Jobs and stray
//! pods, create this epoch's Job, follow it to its end or stop, delete it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use eretes_runtime::{boottime_ns, Deadline, StateContext, Step};
use futures::{AsyncReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::handler::KubeConfig;
use crate::job::{build_job, JobIdentity, CONTAINER};
use crate::logs::{follow, LogTarget};
use crate::names::{
    job_name, selector, task_labels, EPOCH_LABEL, NODE_ANNOTATION, TASK_ID_ANNOTATION,
};
use crate::objects::{
    epoch_of, exit_code, finish_of, has_started, is_deleting, newest_pod_of, owner_uid,
    stuck_reason, tail_of, Finish, Seen,
};
use crate::retry::{status_code, with_retries, CallError};
use crate::spec::KubeSpec;

/// How long a call that changes something (create, delete) keeps trying
/// through transient API failures before the run gives up on it.
const CALL_BUDGET: Duration = Duration::from_secs(60);
/// How long a stopped run waits for its Job to be gone, beyond the grace
/// period. (The node may give up on the run sooner: after the stop grace
/// and 2 s; the delete has been sent by then.)
const GONE_MARGIN: Duration = Duration::from_secs(30);
/// How long the end of a run waits for the log follower to write the rest.
const LOG_DRAIN: Duration = Duration::from_secs(5);
/// Most bytes of the log's end read for the result.
const TAIL_READ: usize = 256 * 1024;
/// The shortest grace a pod is deleted with. Never zero: a zero grace
/// removes the pod from the API at once, before its node has stopped the
/// container, and the next run would start beside it.
const MIN_GRACE_SECONDS: u32 = 1;

/// One run: its Job's identity, the APIs, and how to stop.
pub struct Run {
    jobs: Api<Job>,
    pods: Api<Pod>,
    identity: JobIdentity,
    epoch: i64,
    /// The stop grace in whole seconds, at least [`MIN_GRACE_SECONDS`].
    grace_seconds: u32,
    logs: LogTarget,
    tail_bytes: usize,
    attempt: u32,
}

/// A log follower that is stopped when the run ends, however it ends.
struct Follower(Option<JoinHandle<()>>);

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// Why creating the Job did not succeed.
enum CreateError {
    /// The run was stopped or fenced before the create was sent.
    Stopped,
    /// The API refused the Job itself (422): trying again cannot help.
    Refused(String),
    /// Anything else (the error policy tries again later).
    Failed(String),
}

/// Whether the node's fencing deadline has passed.
fn passed(deadline: Option<Deadline>) -> bool {
    deadline.is_some_and(|deadline| boottime_ns() >= deadline.boottime_ns)
}

/// The status code of a watch's failure, if the API answered one.
fn watch_status(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(error)
        | watcher::Error::WatchStartFailed(error)
        | watcher::Error::WatchFailed(error) => status_code(error),
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Delete `kind` `name` with `params`, through transient failures; whether
/// the API accepted it (or it was gone already).
async fn delete<K>(api: &Api<K>, kind: &str, name: &str, params: &DeleteParams) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("deleting {kind} {name}");
    match with_retries(&what, CALL_BUDGET, || false, || api.delete(name, params)).await {
        Ok(_) => true,
        Err(error) if error.status_code() == Some(404) => true,
        Err(error) => {
            warn!(kind, name, %error, "cannot delete it");
            false
        }
    }
}

impl Run {
    /// The run of `ctx`'s claim for `spec`.
    pub fn new(config: &KubeConfig, ctx: &StateContext, spec: &KubeSpec) -> Run {
        let task = &ctx.task;
        let namespace = spec
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let mut labels = task_labels(&config.namespace, &task.id);
        labels.insert(EPOCH_LABEL.into(), task.epoch.to_string());
        let attempt = u32::try_from(ctx.recent_errors).unwrap_or(u32::MAX - 1) + 1;
        let grace_seconds = u32::try_from(config.stop_grace.as_secs())
            .unwrap_or(u32::MAX)
            .max(MIN_GRACE_SECONDS);
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
            termination_grace_seconds: i64::from(grace_seconds),
            namespace,
        };
        Run {
            jobs: Api::namespaced(config.client.clone(), &identity.namespace),
            pods: Api::namespaced(config.client.clone(), &identity.namespace),
            identity,
            epoch: task.epoch,
            grace_seconds,
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

    fn deleted_by_someone_else(&self) -> Step {
        Step::Fatal(format!(
            "Kubernetes Job {}/{} was deleted by someone else",
            self.identity.namespace,
            self.name()
        ))
    }

    /// The run, from clearing older epochs to its Job's end or stop.
    pub async fn drive(self, ctx: &StateContext, spec: &KubeSpec) -> Step {
        let task = &ctx.task;
        // Every Job and pod of the task, whatever its epoch.
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
        // Jobs and pods whose delete the API accepted (by uid).
        let mut deleted: BTreeSet<String> = BTreeSet::new();
        let mut created = false;
        let mut seen_mine = false;
        let (ended_sender, ended) = watch::channel(false);
        let mut follower = Follower(None);
        let stop_grace: u32;
        loop {
            let fence_passes = async {
                match fence_at {
                    Some(deadline) => tokio::time::sleep_until(deadline.at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = job_events.next() => match event {
                    Some(Ok(event)) => jobs.apply(event),
                    Some(Err(error)) => {
                        if let Some(code @ (401 | 403)) = watch_status(&error) {
                            return Step::Error(format!("cannot watch Jobs in Kubernetes namespace {} ({code}): {error}", self.identity.namespace));
                        }
                        warn!(task = %task.id, %error, "watching the task's Jobs failed; resuming");
                    }
                    None => return Step::Error("the watch of the task's Jobs ended".into()),
                },
                event = pod_events.next() => match event {
                    Some(Ok(event)) => pods.apply(event),
                    Some(Err(error)) => {
                        if let Some(code @ (401 | 403)) = watch_status(&error) {
                            return Step::Error(format!("cannot watch pods in Kubernetes namespace {} ({code}): {error}", self.identity.namespace));
                        }
                        warn!(task = %task.id, %error, "watching the task's pods failed; resuming");
                    }
                    None => return Step::Error("the watch of the task's pods ended".into()),
                },
                _ = task.cancel.cancelled() => {
                    // Lease loss cancels too: then no grace.
                    stop_grace = if passed(fence.current()) { MIN_GRACE_SECONDS } else { self.grace_seconds };
                    break;
                }
                at = fence.changed() => fence_at = at,
                () = fence_passes => {
                    warn!(task = %task.id, epoch = self.epoch, "the node's fencing deadline passed: deleting the task's Job");
                    stop_grace = MIN_GRACE_SECONDS;
                    break;
                }
            }
            if !(jobs.is_synced() && pods.is_synced()) {
                continue;
            }
            // A newer epoch owns the task: this run is stale.
            if let Some(newer) = jobs
                .objects
                .values()
                .find(|job| epoch_of(job) > Some(self.epoch))
            {
                warn!(task = %task.id, epoch = self.epoch, newer = ?newer.metadata.name, "a newer run of the task exists: this one stops");
                stop_grace = MIN_GRACE_SECONDS;
                break;
            }
            self.clear_older(&jobs, &pods, created, &mut deleted).await;
            let mine = jobs.objects.get(self.name());
            if !created {
                match mine {
                    // This epoch's Job from an earlier attempt (a retry, a
                    // resume): it must be gone before a new one starts.
                    Some(job) if finish_of(job).is_some() || is_deleting(job) => {
                        if !is_deleting(job) {
                            self.delete_job(self.name(), MIN_GRACE_SECONDS).await;
                        }
                        continue;
                    }
                    // Created by this epoch before (an answer that was
                    // lost, a stop whose delete failed): carried on.
                    Some(_) => created = true,
                    None => {
                        // Older Jobs and their pods, and stray pods, go
                        // first: nothing of the task may run beside this.
                        if !jobs.objects.is_empty() || !pods.objects.is_empty() {
                            continue;
                        }
                        match self.create(spec, ctx, &fence).await {
                            Ok(()) => created = true,
                            Err(CreateError::Stopped) => {
                                stop_grace = MIN_GRACE_SECONDS;
                                break;
                            }
                            Err(CreateError::Refused(reason)) => return Step::Fatal(reason),
                            Err(CreateError::Failed(reason)) => return Step::Error(reason),
                        }
                        continue;
                    }
                }
            }
            let Some(job) = mine else {
                if seen_mine {
                    return self.deleted_by_someone_else();
                }
                continue;
            };
            seen_mine = true;
            let finish = finish_of(job);
            if is_deleting(job) && finish.is_none() {
                // Being deleted, and not by this run (which would have left
                // the loop): the end is the same as an outright delete.
                return self.deleted_by_someone_else();
            }
            let uid = job.metadata.uid.clone().unwrap_or_default();
            let pod = newest_pod_of(pods.objects.values(), &uid).cloned();
            if follower.0.is_none() {
                if let Some(pod) = pod.as_ref().filter(|pod| has_started(pod)) {
                    follower.0 = Some(self.follow_log(pod, ended.clone()));
                }
            }
            if let Some(reason) = pod.as_ref().and_then(stuck_reason) {
                self.delete_job(self.name(), MIN_GRACE_SECONDS).await;
                return Step::Error(format!(
                    "the pod of Kubernetes Job {}/{} cannot start: {reason} (attempt {})",
                    self.identity.namespace,
                    self.name(),
                    self.attempt
                ));
            }
            let Some(finish) = finish else {
                continue;
            };
            let _ = ended_sender.send(true);
            let pod = match pod.filter(|pod| exit_code(pod).is_some()) {
                Some(pod) => Some(pod),
                // The pod's watch may lag the Job's: read it from the API.
                None => self.latest_pod(&uid).await,
            };
            if follower.0.is_none() {
                // A short Job ended before its pod was seen running: its
                // log is read once, now.
                if let Some(pod) = &pod {
                    follower.0 = Some(self.follow_log(pod, ended.clone()));
                }
            }
            if let Some(handle) = follower.0.take() {
                let _ = tokio::time::timeout(LOG_DRAIN, handle).await;
            }
            let step = self.step(finish, pod.as_ref()).await;
            // The result is read; the Job and its pod go (the task's next
            // run, if any, makes its own).
            self.delete_job(self.name(), MIN_GRACE_SECONDS).await;
            return step;
        }
        // Stopped: delete this run's Job (whether or not this run saw it:
        // a create may have landed unseen) and wait until it is gone.
        let _ = ended_sender.send(true);
        drop(follower);
        self.delete_job(self.name(), stop_grace).await;
        let bound = Instant::now() + Duration::from_secs(u64::from(stop_grace)) + GONE_MARGIN;
        while jobs.objects.contains_key(self.name()) || !jobs.is_synced() {
            tokio::select! {
                event = job_events.next() => match event {
                    Some(Ok(event)) => jobs.apply(event),
                    Some(Err(error)) => warn!(task = %task.id, %error, "watching the task's Jobs failed; resuming"),
                    None => break,
                },
                _ = tokio::time::sleep_until(bound) => {
                    warn!(task = %task.id, job = self.name(), "the stopped run's Job is not gone yet; the task's next run deletes it");
                    break;
                }
            }
        }
        Step::Release
    }

    /// Delete the task's Jobs of older epochs (foreground: pods first,
    /// each with its grace), and, before this run has created its Job, the
    /// task's pods that no Job present controls (orphaned by someone's
    /// delete); each once its delete is accepted.
    async fn clear_older(
        &self,
        jobs: &Seen<Job>,
        pods: &Seen<Pod>,
        created: bool,
        deleted: &mut BTreeSet<String>,
    ) {
        for (name, job) in &jobs.objects {
            let older = epoch_of(job).is_none_or(|epoch| epoch < self.epoch);
            let uid = job.metadata.uid.clone().unwrap_or_default();
            if older && !is_deleting(job) && !deleted.contains(&uid) {
                info!(job = name, "deleting a Job of an older run of the task");
                if self.delete_job(name, self.grace_seconds).await {
                    deleted.insert(uid);
                }
            }
        }
        // Stray pods are looked for only before this run creates its Job:
        // its own pod may show in the pods' watch before its Job does in
        // the Jobs' (two watches), and must not be taken for a stray.
        if created {
            return;
        }
        let controllers: BTreeSet<&str> = jobs
            .objects
            .values()
            .filter_map(|job| job.metadata.uid.as_deref())
            .collect();
        for (name, pod) in &pods.objects {
            let stray = owner_uid(pod).is_none_or(|owner| !controllers.contains(owner));
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if stray && !is_deleting(pod) && !deleted.contains(&uid) {
                info!(
                    pod = name,
                    "deleting a pod of the task that no Job controls"
                );
                if self.delete_pod(name, self.grace_seconds).await {
                    deleted.insert(uid);
                }
            }
        }
    }

    /// Create this run's Job, unless the run is stopped or fenced before
    /// the call is sent; one that exists already (a create whose answer
    /// was lost) is this run's.
    async fn create(
        &self,
        spec: &KubeSpec,
        ctx: &StateContext,
        fence: &eretes_runtime::FenceDeadline,
    ) -> Result<(), CreateError> {
        let job = build_job(spec, &self.identity);
        let params = PostParams::default();
        let mut fence = fence.clone();
        let stopped = || ctx.task.cancel.is_cancelled() || passed(fence.current());
        let answer = with_retries("creating the Job", CALL_BUDGET, stopped, || {
            self.jobs.create(&params, &job)
        })
        .await;
        match answer {
            Ok(_) => {
                info!(job = self.name(), namespace = %self.identity.namespace, "created the Job");
                Ok(())
            }
            Err(error) if error.status_code() == Some(409) => Ok(()),
            Err(CallError::Aborted) => Err(CreateError::Stopped),
            Err(error) if error.status_code() == Some(422) => Err(CreateError::Refused(format!(
                "the Kubernetes API refused Job {}/{}: {error}",
                self.identity.namespace,
                self.name()
            ))),
            Err(error) => Err(CreateError::Failed(format!(
                "cannot create Kubernetes Job {}/{}: {error} (attempt {})",
                self.identity.namespace,
                self.name(),
                self.attempt
            ))),
        }
    }

    /// Delete Job `name` and its pods (foreground: the pods first), each
    /// pod given `grace` seconds at most. Whether the API accepted it (or
    /// the Job was gone); a delete that keeps failing is logged, and the
    /// next decision tries again.
    async fn delete_job(&self, name: &str, grace: u32) -> bool {
        let params = DeleteParams::foreground().grace_period(grace.max(MIN_GRACE_SECONDS));
        delete(&self.jobs, "Job", name, &params).await
    }

    /// Delete pod `name` with `grace` seconds; whether the API accepted it.
    async fn delete_pod(&self, name: &str, grace: u32) -> bool {
        let params = DeleteParams::background().grace_period(grace.max(MIN_GRACE_SECONDS));
        delete(&self.pods, "pod", name, &params).await
    }

    /// Follow `pod`'s log into the task's log file until `ended` (and the
    /// stream after it) ends.
    fn follow_log(&self, pod: &Pod, ended: watch::Receiver<bool>) -> JoinHandle<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        tokio::spawn(follow(self.pods.clone(), name, self.logs.clone(), ended))
    }

    /// The task's step for its Job's `finish`, with the pod's exit code and
    /// the end of its log.
    async fn step(&self, finish: Finish, pod: Option<&Pod>) -> Step {
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

    /// The newest pod of this run's Job (controlled by `uid`), from the API.
    async fn latest_pod(&self, uid: &str) -> Option<Pod> {
        let list = ListParams::default().labels(&format!("job-name={}", self.name()));
        let pods = with_retries(
            "listing the Job's pods",
            Duration::from_secs(10),
            || false,
            || self.pods.list(&list),
        )
        .await
        .ok()?;
        newest_pod_of(pods.items.iter(), uid).cloned()
    }

    /// The end of the pod's log: its last 20 lines, cut to `tail_bytes`
    /// (bytes that are not UTF-8 shown as U+FFFD).
    async fn log_tail(&self, pod: &str) -> String {
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(20),
            ..LogParams::default()
        };
        let read = async {
            let stream = self.pods.log_stream(pod, &params).await?;
            let mut bytes = Vec::new();
            stream
                .take(TAIL_READ as u64)
                .read_to_end(&mut bytes)
                .await
                .map_err(kube::Error::ReadEvents)?;
            Ok::<_, kube::Error>(bytes)
        };
        match tokio::time::timeout(crate::retry::CALL_TIMEOUT, read).await {
            Ok(Ok(bytes)) => tail_of(&String::from_utf8_lossy(&bytes), self.tail_bytes),
            Ok(Err(error)) => {
                warn!(pod, %error, "cannot read the end of the pod's log");
                String::new()
            }
            Err(_) => {
                warn!(pod, "reading the end of the pod's log timed out");
                String::new()
            }
        }
    }
}
