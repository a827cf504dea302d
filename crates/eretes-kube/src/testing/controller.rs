//! The Job controller: defaulting and creating Jobs, creating each Job's
//! pod from its template, counting pod outcomes against `backoffLimit`,
//! `activeDeadlineSeconds`, the Job's conditions and status, and the TTL
//! controller (`ttlSecondsAfterFinished`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus, UncountedTerminatedPods};
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use tokio::sync::watch;

use super::deletion::DeleteOpts;
use super::fake_api::{JobEvent, JobEventKind, Propagation};
use super::kubelet::{controller_uid, is_ready, is_terminal, kubelet, pod_phase, set_pod_state};
use super::status::ApiError;
use super::store::{lock, new_uid, now, random_suffix, Key, Kind, Obj, PodRuntime, State};
use super::validation::{validate_job, FieldErr};

/// The pod's default `terminationGracePeriodSeconds`.
pub(crate) const DEFAULT_GRACE: i64 = 30;
/// The one node every pod runs on.
const NODE_NAME: &str = "fake-node";
/// How generated names are cut before the random suffix (63 - 5).
const MAX_GENERATE_NAME: usize = 58;

/// Fills in server-set metadata of a new object: the name (from
/// `generateName`), namespace, uid, creationTimestamp, generation.
pub(crate) fn prepare_meta(
    meta: &mut ObjectMeta,
    namespace: &str,
    generation: bool,
) -> Result<(), ApiError> {
    if let Some(ns) = meta.namespace.as_deref().filter(|ns| !ns.is_empty()) {
        if ns != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    if meta.name.as_deref().unwrap_or("").is_empty() {
        if let Some(prefix) = meta.generate_name.as_deref().filter(|g| !g.is_empty()) {
            let cut: String = prefix.chars().take(MAX_GENERATE_NAME).collect();
            meta.name = Some(format!("{cut}{}", random_suffix(5)));
        }
    }
    meta.namespace = Some(namespace.to_string());
    meta.uid = Some(new_uid());
    meta.creation_timestamp = Some(now());
    meta.generation = generation.then_some(1);
    meta.resource_version = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.managed_fields = None;
    Ok(())
}

/// Defaults a new Job as the server does (`SetDefaults_Job` and the
/// strategy's `PrepareForCreate`): the generated selector and the
/// `job-name`/`controller-uid` template labels, counts, the pod template's
/// defaults, and an empty status.
fn default_job(job: &mut Job) {
    let name = job.metadata.name.clone().unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let spec = job.spec.get_or_insert_with(Default::default);
    let template_meta = spec.template.metadata.get_or_insert_with(Default::default);
    // The Job's own labels default to the template's (before the generated
    // ones are added).
    if job.metadata.labels.as_ref().is_none_or(BTreeMap::is_empty) {
        job.metadata.labels = template_meta.labels.clone();
    }
    if spec.manual_selector != Some(true) {
        let labels = template_meta.labels.get_or_insert_with(Default::default);
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", &uid),
            ("batch.kubernetes.io/job-name", &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels.insert(k.to_string(), v.clone());
        }
        if spec.selector.is_none() {
            spec.selector = Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "batch.kubernetes.io/controller-uid".to_string(),
                    uid,
                )])),
                ..Default::default()
            });
        }
    }
    spec.backoff_limit.get_or_insert(6);
    spec.completions.get_or_insert(1);
    spec.parallelism.get_or_insert(1);
    spec.completion_mode
        .get_or_insert_with(|| "NonIndexed".to_string());
    spec.suspend.get_or_insert(false);
    spec.pod_replacement_policy
        .get_or_insert_with(|| "TerminatingOrFailed".to_string());
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    pod.restart_policy
        .get_or_insert_with(|| "Always".to_string());
    pod.termination_grace_period_seconds
        .get_or_insert(DEFAULT_GRACE);
    pod.dns_policy
        .get_or_insert_with(|| "ClusterFirst".to_string());
    pod.scheduler_name
        .get_or_insert_with(|| "default-scheduler".to_string());
    pod.security_context.get_or_insert_with(Default::default);
    for c in &mut pod.containers {
        c.termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".to_string());
        c.termination_message_policy
            .get_or_insert_with(|| "File".to_string());
        let latest = c.image.as_deref().is_none_or(|i| {
            let last = i.rsplit('/').next().unwrap_or(i);
            !last.contains(':') || last.ends_with(":latest")
        });
        c.image_pull_policy
            .get_or_insert_with(|| if latest { "Always" } else { "IfNotPresent" }.to_string());
    }
    job.status = Some(JobStatus::default());
}

fn has_condition(status: &JobStatus, kind: &str) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == kind && c.status == "True")
}

fn job_condition(kind: &str, reason: &str, message: &str) -> JobCondition {
    JobCondition {
        type_: kind.to_string(),
        status: "True".to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_probe_time: Some(now()),
        last_transition_time: Some(now()),
    }
}
/// How the Job controller counts a pod: succeeded, failed, or still active
/// (`None`). A terminating pod that has not succeeded counts as failed at
/// once, as with the default `podReplacementPolicy: TerminatingOrFailed`.
fn pod_outcome(pod: &Pod) -> Option<bool> {
    match pod_phase(pod) {
        "Succeeded" => Some(true),
        "Failed" => Some(false),
        _ if pod.metadata.deletion_timestamp.is_some() => Some(false),
        _ => None,
    }
}

impl State {
    /// Creates a Job (POST): defaulting, validation, then the controller
    /// creates its pod. Returns the Job as created.
    pub(crate) fn create_job(
        &mut self,
        ns: &str,
        mut job: Job,
        dry_run: bool,
    ) -> Result<Obj, ApiError> {
        prepare_meta(&mut job.metadata, ns, true)?;
        let name = job.metadata.name.clone().unwrap_or_default();
        let user_selector = job
            .spec
            .as_ref()
            .is_some_and(|s| s.selector.is_some() && s.manual_selector != Some(true));
        default_job(&mut job);
        let mut errs = validate_job(&job);
        if user_selector {
            errs.push(FieldErr::invalid(
                "spec.selector",
                "",
                "`selector` will be auto-generated",
            ));
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(Kind::Job, &name, &errs));
        }
        let key = Key::new(Kind::Job, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(Kind::Job, &name));
        }
        if dry_run {
            return Ok(Obj::Job(job));
        }
        let created = self.insert(Obj::Job(job));
        self.job_history
            .push(job_event(&created, JobEventKind::Created));
        self.sync_job(ns, &name);
        Ok(created)
    }

    /// Creates the pod for a Job from its template, and starts its kubelet.
    fn create_job_pod(&mut self, job: &Job) {
        let script = (self.kubelet)(job);
        let job_name = job.metadata.name.clone().unwrap_or_default();
        let ns = job.metadata.namespace.clone().unwrap_or_default();
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut meta = template.metadata.unwrap_or_default();
        meta.generate_name = Some(format!("{job_name}-"));
        meta.name = None;
        // A clash of generated names is unlikely; a few tries make it moot.
        for _ in 0..10 {
            let candidate = format!("{job_name}-{}", random_suffix(5));
            if !self
                .objects
                .contains_key(&Key::new(Kind::Pod, &ns, &candidate))
            {
                meta.name = Some(candidate);
                break;
            }
        }
        let Some(name) = meta.name.clone() else {
            return;
        };
        if prepare_meta(&mut meta, &ns, true).is_err() {
            return;
        }
        meta.owner_references = Some(vec![OwnerReference {
            api_version: "batch/v1".to_string(),
            kind: "Job".to_string(),
            name: job_name,
            uid: job.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let mut spec = template.spec.unwrap_or_default();
        spec.node_name = Some(NODE_NAME.to_string());
        let container = spec
            .containers
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let mut pod = Pod {
            metadata: meta,
            spec: Some(spec),
            status: Some(PodStatus {
                qos_class: Some("BestEffort".to_string()),
                start_time: Some(now()),
                ..Default::default()
            }),
        };
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ContainerCreating".to_string()),
                message: None,
            }),
            ..Default::default()
        };
        set_pod_state(&mut pod, "Pending", waiting);
        let created = self.insert(Obj::Pod(pod));
        let uid = created.uid().to_string();
        let (kill_tx, kill_rx) = watch::channel(None);
        let (log_tx, _) = watch::channel(());
        self.pods_rt.insert(
            uid.clone(),
            PodRuntime {
                container,
                log: Vec::new(),
                log_tx,
                kill_tx,
                started: false,
                terminated: false,
            },
        );
        let key = Key::new(Kind::Pod, &ns, &name);
        self.spawn(move |shared| kubelet(shared, key, uid, script, kill_rx));
    }

    /// The Job controller's sync of one Job: counts its pods, decides
    /// success, failure (backoff limit or deadline) or a new pod, stops
    /// pods a finished Job no longer needs, adds the terminal condition once
    /// no pod is left running, and writes the status (MODIFIED only when it
    /// changed).
    pub(crate) fn sync_job(&mut self, ns: &str, name: &str) {
        let key = Key::new(Kind::Job, ns, name);
        let Some(Obj::Job(job)) = self.objects.get(&key).cloned() else {
            return;
        };
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let spec = job.spec.clone().unwrap_or_default();
        let mut status = job.status.clone().unwrap_or_default();
        let mut succeeded = status.succeeded.unwrap_or(0);
        let mut failed = status.failed.unwrap_or(0);
        self.count_pods(&uid, ns, &mut succeeded, &mut failed);
        let finished = has_condition(&status, "Complete") || has_condition(&status, "Failed");
        let deleting = job.metadata.deletion_timestamp.is_some();
        let suspended = spec.suspend == Some(true);
        let mut target: Option<JobCondition> = status
            .conditions
            .iter()
            .flatten()
            .find(|c| {
                (c.type_ == "SuccessCriteriaMet" || c.type_ == "FailureTarget")
                    && c.status == "True"
            })
            .cloned();
        if !finished && !deleting && !suspended {
            let rt = self.jobs_rt.entry(uid.clone()).or_default();
            if status.start_time.is_none() {
                status.start_time = Some(now());
                rt.started_at = Some(Instant::now());
                if let Some(secs) = spec.active_deadline_seconds {
                    let (ns, name) = (ns.to_string(), name.to_string());
                    let after = Duration::from_secs(secs.max(0).unsigned_abs());
                    self.spawn(move |shared| async move {
                        tokio::time::sleep(after).await;
                        lock(&shared).sync_job(&ns, &name);
                    });
                }
            }
            let rt = self.jobs_rt.entry(uid.clone()).or_default();
            let past_deadline =
                spec.active_deadline_seconds
                    .zip(rt.started_at)
                    .is_some_and(|(secs, at)| {
                        at.elapsed() >= Duration::from_secs(secs.max(0).unsigned_abs())
                    });
            if target.is_none() {
                target = if succeeded >= spec.completions.unwrap_or(1).max(1) {
                    Some(job_condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ))
                } else if failed > spec.backoff_limit.unwrap_or(6) {
                    Some(job_condition(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ))
                } else if past_deadline {
                    Some(job_condition(
                        "FailureTarget",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ))
                } else {
                    None
                };
                if let Some(t) = &target {
                    status
                        .conditions
                        .get_or_insert_with(Vec::new)
                        .push(t.clone());
                }
            }
            let active: Vec<Key> = self
                .owned_pods(ns, &uid)
                .filter(|p| pod_outcome(p).is_none())
                .map(|p| Key::new(Kind::Pod, ns, p.metadata.name.as_deref().unwrap_or("")))
                .collect();
            if target.is_some() {
                for pod in active {
                    let _ = self.delete_pod(&pod, &DeleteOpts::default());
                }
            } else if active.is_empty() {
                self.create_job_pod(&job);
            }
            self.count_pods(&uid, ns, &mut succeeded, &mut failed);
        }
        let pods: Vec<&Pod> = self.owned_pods(ns, &uid).collect();
        let active = pods.iter().filter(|p| pod_outcome(p).is_none()).count() as i32;
        let ready = pods
            .iter()
            .filter(|p| pod_outcome(p).is_none() && is_ready(p))
            .count() as i32;
        let terminating = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some() && !is_terminal(p))
            .count() as i32;
        let mut now_finished = false;
        if let Some(t) =
            target.filter(|_| !finished && !deleting && active == 0 && terminating == 0)
        {
            let success = t.type_ == "SuccessCriteriaMet";
            let final_type = if success { "Complete" } else { "Failed" };
            let cond = JobCondition {
                type_: final_type.to_string(),
                ..job_condition(
                    final_type,
                    t.reason.as_deref().unwrap_or(""),
                    t.message.as_deref().unwrap_or(""),
                )
            };
            status.conditions.get_or_insert_with(Vec::new).push(cond);
            if success {
                status.completion_time = Some(now());
            }
            now_finished = true;
        }
        status.active = (active > 0).then_some(active);
        status.ready = Some(ready);
        status.terminating = Some(terminating);
        status.succeeded = (succeeded > 0).then_some(succeeded);
        status.failed = (failed > 0).then_some(failed);
        status.uncounted_terminated_pods = Some(UncountedTerminatedPods::default());
        self.update(&key, |o| {
            if let Obj::Job(j) = o {
                j.status = Some(status);
            }
        });
        if now_finished {
            self.schedule_ttl(&job);
        }
    }

    /// Counts the Job's pods that finished since the last count.
    fn count_pods(&mut self, job_uid: &str, ns: &str, succeeded: &mut i32, failed: &mut i32) {
        let outcomes: Vec<(String, bool)> = self
            .owned_pods(ns, job_uid)
            .filter_map(|p| pod_outcome(p).map(|o| (p.metadata.uid.clone().unwrap_or_default(), o)))
            .collect();
        let rt = self.jobs_rt.entry(job_uid.to_string()).or_default();
        for (pod_uid, ok) in outcomes {
            if rt.counted.insert(pod_uid) {
                *if ok { &mut *succeeded } else { &mut *failed } += 1;
            }
        }
        *failed += std::mem::take(&mut rt.uncounted_removed);
    }

    /// The pods in `ns` whose controller is the Job with `job_uid`.
    pub(crate) fn owned_pods<'a>(
        &'a self,
        ns: &'a str,
        job_uid: &'a str,
    ) -> impl Iterator<Item = &'a Pod> + 'a {
        self.objects
            .range(Key::new(Kind::Pod, ns, "")..)
            .take_while(move |(k, _)| k.kind == Kind::Pod && k.namespace == ns)
            .filter_map(|(_, o)| match o {
                Obj::Pod(p) if controller_uid(p) == Some(job_uid) => Some(p),
                _ => None,
            })
    }

    /// Starts the TTL-after-finished countdown of a Job that just finished.
    fn schedule_ttl(&mut self, job: &Job) {
        let Some(ttl) = job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished) else {
            return;
        };
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let rt = self.jobs_rt.entry(uid.clone()).or_default();
        if std::mem::replace(&mut rt.ttl_scheduled, true) {
            return;
        }
        let key = Key::new(
            Kind::Job,
            job.metadata.namespace.as_deref().unwrap_or(""),
            job.metadata.name.as_deref().unwrap_or(""),
        );
        let after = Duration::from_secs(ttl.max(0).unsigned_abs().into());
        self.spawn(move |shared| async move {
            tokio::time::sleep(after).await;
            let mut st = lock(&shared);
            if st.objects.get(&key).is_some_and(|o| o.uid() == uid) {
                let opts = DeleteOpts {
                    propagation: Some(Propagation::Foreground),
                    ..Default::default()
                };
                let _ = st.delete_job(&key, &opts);
            }
        });
    }
}

/// A [`JobEvent`] for a Job now.
pub(crate) fn job_event(obj: &Obj, kind: JobEventKind) -> JobEvent {
    JobEvent {
        at: Instant::now(),
        kind,
        namespace: obj.namespace().to_string(),
        name: obj.name().to_string(),
        uid: obj.uid().to_string(),
        labels: obj.meta().labels.clone().unwrap_or_default(),
    }
}
