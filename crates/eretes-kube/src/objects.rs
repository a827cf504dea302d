//! What a run reads off the Jobs and pods it watches.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;

use crate::job::CONTAINER;
use crate::names::EPOCH_LABEL;

/// What a watch has shown: the objects by name, kept whole across a
/// re-list (after a 410) until the new list is complete.
pub struct Seen<K> {
    /// The objects, by name.
    pub objects: BTreeMap<String, K>,
    /// Objects of a re-list in progress (between `Init` and `InitDone`).
    relisting: Option<BTreeMap<String, K>>,
    /// A full list has been seen.
    ready: bool,
}

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Seen {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }
}

impl<K: kube::Resource> Seen<K> {
    /// Take in one watch event. Objects without a name (which the API never
    /// sends) are ignored rather than kept under an empty one.
    pub fn apply(&mut self, event: Event<K>) {
        let name = |object: &K| object.meta().name.clone().filter(|n| !n.is_empty());
        match event {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some(name) = name(&object) {
                    self.relisting
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, object);
                }
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.ready = true;
            }
            Event::Apply(object) => {
                if let Some(name) = name(&object) {
                    self.objects.insert(name, object);
                }
            }
            Event::Delete(object) => {
                if let Some(name) = name(&object) {
                    self.objects.remove(&name);
                }
            }
        }
    }

    /// Whether the objects are a whole, current list (listed, and no
    /// re-list under way).
    pub fn is_synced(&self) -> bool {
        self.ready && self.relisting.is_none()
    }
}

/// How a Job ended, as its conditions tell.
pub enum Finish {
    /// Complete.
    Succeeded,
    /// Failed, and why.
    Failed(String),
}

/// The epoch a Job of the task was made for, from its label (`None` for a
/// Job whose label is missing or garbled: treated as older than any).
pub fn epoch_of(job: &Job) -> Option<i64> {
    job.metadata.labels.as_ref()?.get(EPOCH_LABEL)?.parse().ok()
}

/// Whether the object is being deleted.
pub fn is_deleting<K: kube::Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_some()
}

/// How a Job ended, if it did: a `Complete` or `Failed` condition that holds.
pub fn finish_of(job: &Job) -> Option<Finish> {
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

/// The uid of the object that controls `pod` (its Job), if any.
pub fn owner_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str())
}

/// The newest pod controlled by the Job with `uid`.
pub fn newest_pod_of<'a>(pods: impl Iterator<Item = &'a Pod>, uid: &str) -> Option<&'a Pod> {
    pods.filter(|pod| owner_uid(pod) == Some(uid))
        .max_by_key(|pod| pod.metadata.creation_timestamp.clone())
}

/// Whether the pod's container has started (so its log can be read).
pub fn has_started(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Running" | "Succeeded" | "Failed"))
}

/// The exit code of the pod's container `main`, once it has terminated.
pub fn exit_code(pod: &Pod) -> Option<i32> {
    main_status(pod)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|terminated| terminated.exit_code)
}

/// Waiting reasons of a container that will not start by itself: a bad or
/// missing image, or a configuration it cannot be given. The attempt fails
/// (and the state machine backs off and tries again) rather than waiting
/// for ever.
const STUCK: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why the pod's container cannot start, if it is stuck.
pub fn stuck_reason(pod: &Pod) -> Option<String> {
    let waiting = main_status(pod)?.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    STUCK
        .contains(&reason)
        .then(|| match waiting.message.as_deref() {
            Some(message) if !message.is_empty() => format!("{reason}: {message}"),
            _ => reason.to_string(),
        })
}

fn main_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|status| status.name == CONTAINER)
}

/// At most the last `bytes` of `log`, cut at a character boundary.
pub fn tail_of(log: &str, bytes: usize) -> String {
    let mut start = log.len().saturating_sub(bytes);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}
