//! Deletion as the API server and the garbage collector do it: graceful pod
//! deletion, the propagation policies of a Job's deletion (Foreground,
//! Background, Orphan) with their finalizers, and preconditions.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::controller::{job_event, DEFAULT_GRACE};
use super::fake_api::{JobEventKind, Propagation, MAX_SIMULATED_GRACE};
use super::kubelet::{controller_uid, is_terminal};
use super::status::ApiError;
use super::store::{lock, now, Key, Kind, Obj, State};

/// The garbage collector's reaction time.
const GC_DELAY: Duration = Duration::from_millis(20);

/// The finalizers the garbage collector acts on.
const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

/// A parsed `DeleteOptions`.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOpts {
    pub grace: Option<i64>,
    pub propagation: Option<Propagation>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

/// What a DELETE did.
pub(crate) enum Deleted {
    /// The object remains, being deleted (deletionTimestamp set).
    Pending(Obj),
    /// The object is gone; this was its final state.
    Removed(Obj),
}

impl State {
    /// Removes a pod for good (DELETED): its kubelet and log followers end,
    /// and its Job counts it as failed if it had not counted it yet.
    pub(crate) fn remove_pod(&mut self, key: &Key) -> Option<Obj> {
        let obj = self.remove(key)?;
        self.pods_rt.remove(obj.uid());
        if let Obj::Pod(pod) = &obj {
            if let Some(owner) = controller_uid(pod) {
                if let Some(rt) = self.jobs_rt.get_mut(owner) {
                    if rt.counted.insert(obj.uid().to_string()) {
                        rt.uncounted_removed += 1;
                    }
                }
            }
        }
        self.schedule_gc();
        Some(obj)
    }

    /// DELETE of a pod: graceful (deletionTimestamp now + grace, the kubelet
    /// stops the container and removes the pod), or at once with grace 0,
    /// for a pod that has finished, or one on no node.
    pub(crate) fn delete_pod(&mut self, key: &Key, opts: &DeleteOpts) -> Result<Deleted, ApiError> {
        let Some(Obj::Pod(pod)) = self.objects.get(key).cloned() else {
            return Err(ApiError::not_found(Kind::Pod, &key.name));
        };
        check_preconditions(&Obj::Pod(pod.clone()), opts)?;
        if opts.dry_run {
            return Ok(Deleted::Pending(Obj::Pod(pod)));
        }
        let default_grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE);
        let mut grace = opts.grace.unwrap_or(default_grace).max(0);
        if is_terminal(&pod)
            || pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_none()
        {
            grace = 0;
        }
        if grace == 0 {
            let removed = self.remove_pod(key).expect("the pod was just read");
            return Ok(Deleted::Removed(removed));
        }
        let deadline = Timestamp::now() + SignedDuration::from_secs(grace);
        let current = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0);
        if current.is_some_and(|c| c <= deadline) {
            // A second deletion may shorten the grace period, never extend it.
            return Ok(Deleted::Pending(Obj::Pod(pod)));
        }
        let updated = self
            .update(key, |o| {
                let m = o.meta_mut();
                if m.deletion_timestamp.is_none() {
                    m.generation = m.generation.map(|g| g + 1);
                }
                m.deletion_timestamp = Some(Time(deadline));
                m.deletion_grace_period_seconds = Some(grace);
            })
            .expect("the pod was just read");
        let simulated = Duration::from_secs(grace.unsigned_abs()).min(MAX_SIMULATED_GRACE);
        if let Some(rt) = self.pods_rt.get(updated.uid()) {
            rt.kill_tx.send_replace(Some(Instant::now() + simulated));
        }
        Ok(Deleted::Pending(updated))
    }

    /// A pod DELETE from a client: the deletion, then the owner's sync (its
    /// Job sees a terminating or vanished pod).
    pub(crate) fn delete_pod_request(
        &mut self,
        key: &Key,
        opts: &DeleteOpts,
    ) -> Result<Deleted, ApiError> {
        let done = self.delete_pod(key, opts)?;
        if let Deleted::Pending(Obj::Pod(p)) | Deleted::Removed(Obj::Pod(p)) = &done {
            if !opts.dry_run {
                self.sync_owner(p);
            }
        }
        Ok(done)
    }

    /// DELETE of a Job with its propagation policy (default Orphan, as for
    /// batch/v1 Jobs): Background removes it now and the garbage collector
    /// deletes its pods after; Foreground and Orphan mark it (deletionTimestamp
    /// and finalizer) and the garbage collector finishes.
    pub(crate) fn delete_job(&mut self, key: &Key, opts: &DeleteOpts) -> Result<Deleted, ApiError> {
        let Some(obj) = self.objects.get(key).cloned() else {
            return Err(ApiError::not_found(Kind::Job, &key.name));
        };
        check_preconditions(&obj, opts)?;
        if opts.dry_run {
            return Ok(Deleted::Pending(obj));
        }
        let policy = opts.propagation.clone().unwrap_or(Propagation::Orphan);
        self.job_history
            .push(job_event(&obj, JobEventKind::Deleted(policy.clone())));
        if obj.meta().deletion_timestamp.is_some() {
            return Ok(Deleted::Pending(obj));
        }
        let finalizer = match policy {
            Propagation::Background => {
                let removed = self.remove_job(key).expect("the job was just read");
                self.schedule_gc();
                return Ok(Deleted::Removed(removed));
            }
            Propagation::Foreground => FOREGROUND,
            Propagation::Orphan => ORPHAN,
        };
        let updated = self
            .update(key, |o| {
                let m = o.meta_mut();
                m.deletion_timestamp = Some(now());
                m.deletion_grace_period_seconds = Some(0);
                m.generation = m.generation.map(|g| g + 1);
                m.finalizers
                    .get_or_insert_with(Vec::new)
                    .push(finalizer.to_string());
            })
            .expect("the job was just read");
        self.schedule_gc();
        Ok(Deleted::Pending(updated))
    }

    /// Removes a Job for good (DELETED).
    fn remove_job(&mut self, key: &Key) -> Option<Obj> {
        let removed = self.remove(key)?;
        self.job_history
            .push(job_event(&removed, JobEventKind::Removed));
        self.jobs_rt.remove(removed.uid());
        Some(removed)
    }

    /// Runs the garbage collector shortly (it acts on its own time, after
    /// the request that gave it work has been answered).
    pub(crate) fn schedule_gc(&mut self) {
        self.spawn(|shared| async move {
            tokio::time::sleep(GC_DELAY).await;
            lock(&shared).gc();
        });
    }

    /// The garbage collector: orphans the pods of Jobs deleted with Orphan,
    /// deletes the pods of Jobs deleted with Foreground and removes those
    /// Jobs once their pods are gone, and deletes pods whose Job is gone.
    fn gc(&mut self) {
        let deleting: Vec<(Key, String, bool)> = self
            .objects
            .values()
            .filter(|o| o.kind() == Kind::Job && o.meta().deletion_timestamp.is_some())
            .filter_map(|o| {
                let fin = o.meta().finalizers.iter().flatten();
                let fin: Vec<&String> = fin.collect();
                let foreground = fin.iter().any(|f| *f == FOREGROUND);
                let orphan = fin.iter().any(|f| *f == ORPHAN);
                (foreground || orphan).then(|| (o.key(), o.uid().to_string(), foreground))
            })
            .collect();
        for (key, uid, foreground) in deleting {
            let pods: Vec<Key> = self
                .owned_pods(&key.namespace, &uid)
                .map(|p| {
                    Key::new(
                        Kind::Pod,
                        &key.namespace,
                        p.metadata.name.as_deref().unwrap_or(""),
                    )
                })
                .collect();
            if !foreground {
                for pod in &pods {
                    self.update(pod, |o| {
                        let refs = o.meta_mut().owner_references.take().unwrap_or_default();
                        let kept: Vec<OwnerReference> =
                            refs.into_iter().filter(|r| r.uid != uid).collect();
                        o.meta_mut().owner_references = (!kept.is_empty()).then_some(kept);
                    });
                }
                self.remove_job(&key);
            } else if pods.is_empty() {
                self.remove_job(&key);
            } else {
                for pod in &pods {
                    let terminating = self
                        .objects
                        .get(pod)
                        .is_some_and(|o| o.meta().deletion_timestamp.is_some());
                    if !terminating {
                        let _ = self.delete_pod(pod, &DeleteOpts::default());
                    }
                }
                self.sync_job(&key.namespace, &key.name);
            }
        }
        let live_jobs: std::collections::HashSet<String> = self
            .objects
            .values()
            .filter(|o| o.kind() == Kind::Job)
            .map(|o| o.uid().to_string())
            .collect();
        let dangling: Vec<Key> = self
            .objects
            .values()
            .filter_map(|o| match o {
                Obj::Pod(p)
                    if p.metadata.deletion_timestamp.is_none()
                        && controller_uid(p).is_some_and(|u| !live_jobs.contains(u)) =>
                {
                    Some(o.key())
                }
                _ => None,
            })
            .collect();
        for pod in dangling {
            let _ = self.delete_pod(&pod, &DeleteOpts::default());
        }
    }
}

/// Refuses a deletion whose uid or resourceVersion precondition fails.
pub(crate) fn check_preconditions(obj: &Obj, opts: &DeleteOpts) -> Result<(), ApiError> {
    let kind = obj.kind();
    if let Some(uid) = opts.uid.as_deref().filter(|u| *u != obj.uid()) {
        return Err(ApiError::conflict(
            kind,
            obj.name(),
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                obj.uid()
            ),
        ));
    }
    let rv = obj.meta().resource_version.as_deref().unwrap_or("");
    if let Some(want) = opts.resource_version.as_deref().filter(|r| *r != rv) {
        return Err(ApiError::conflict(
            kind,
            obj.name(),
            &format!(
                "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rv}"
            ),
        ));
    }
    Ok(())
}
