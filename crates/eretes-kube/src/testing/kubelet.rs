//! The fake kubelet: it plays each pod's [`PodScript`] (Pending, Running
//! with its log lines, exit), reports the pod's status as a kubelet would,
//! stops the container when the pod is deleted (honouring or ignoring
//! SIGTERM), and removes the pod when the container is done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, Pod,
    PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

use super::fake_api::PodScript;
use super::store::{lock, now, Key, Kind, Obj, Shared, State};

/// From a container's end (or a kill of a pod that is not running) to the
/// pod's removal: the kubelet confirming the deletion.
const KUBELET_CONFIRM: Duration = Duration::from_millis(50);
/// How long a process that honours SIGTERM takes to exit.
const SIGTERM_EXIT: Duration = Duration::from_millis(50);

/// The pod's phase (a pod the kubelet has not reported on is Pending).
pub(crate) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod has finished (Succeeded or Failed).
pub(crate) fn is_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// Whether the pod's Ready condition is True.
pub(crate) fn is_ready(pod: &Pod) -> bool {
    let conds = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The uid of a pod's controlling owner.
pub(crate) fn controller_uid(pod: &Pod) -> Option<&str> {
    let refs = pod.metadata.owner_references.iter().flatten();
    refs.filter(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
        .next()
}

/// A pod condition as of now.
fn pod_condition(kind: &str, status: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: kind.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.map(str::to_string),
        last_transition_time: Some(now()),
        ..Default::default()
    }
}

/// Sets every container's status and the pod's conditions for a phase.
pub(crate) fn set_pod_state(pod: &mut Pod, phase: &str, state: ContainerState) {
    let running = phase == "Running";
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some(phase.to_string());
    let not_ready = match phase {
        "Pending" | "Running" => Some("ContainersNotReady"),
        _ => Some("PodCompleted"),
    };
    status.conditions = Some(vec![
        pod_condition("PodScheduled", true, None),
        pod_condition("Initialized", true, None),
        pod_condition(
            "ContainersReady",
            running,
            if running { None } else { not_ready },
        ),
        pod_condition("Ready", running, if running { None } else { not_ready }),
    ]);
    let started = state.waiting.is_none();
    status.container_statuses = Some(
        containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: if started {
                    format!("fake://{}", c.image.as_deref().unwrap_or(""))
                } else {
                    String::new()
                },
                container_id: started.then(|| format!("fake://{uid}/{}", c.name)),
                ready: running,
                restart_count: 0,
                started: Some(running),
                state: Some(state.clone()),
                ..Default::default()
            })
            .collect(),
    );
}

/// What the kubelet task does next.
enum Wake {
    /// The timer it waited for passed.
    Elapsed,
    /// The pod is being deleted; stop the container by this instant.
    Killed(Instant),
    /// The pod is gone (removed, or the server dropped).
    Gone,
    /// Nothing to act on (a wake-up without a deadline).
    Spurious,
}

/// Waits until `until` (forever when `None`) or a deletion.
async fn wait(kill: &mut watch::Receiver<Option<Instant>>, until: Option<Instant>) -> Wake {
    let timer = async {
        match until {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = timer => Wake::Elapsed,
        changed = kill.changed() => match changed {
            Err(_) => Wake::Gone,
            Ok(()) => match *kill.borrow_and_update() {
                Some(deadline) => Wake::Killed(deadline),
                None => Wake::Spurious,
            },
        },
    }
}

/// The container's life, as the kubelet would report it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Life {
    Pending,
    Running,
    Exited,
}

/// One pod's kubelet: Pending for `pending_for`, Running while it writes its
/// log over `run_for`, then exits with `exit_code` (or runs until deleted).
/// A deletion stops it: at once unless it ignores SIGTERM, in which case at
/// the grace deadline; the pod is then removed.
pub(crate) async fn kubelet(
    shared: Arc<Shared>,
    key: Key,
    uid: String,
    script: PodScript,
    mut kill: watch::Receiver<Option<Instant>>,
) {
    let created = Instant::now();
    let mut life = Life::Pending;
    let mut started = created;
    let mut next_line = 0usize;
    let mut kill_at: Option<Instant> = None;
    let lines = script.log.len();
    // Each pass either advances the script (at most lines + 2 steps), takes
    // a deletion, or ends; a hard cap keeps a confused pass count finite.
    for _ in 0..(lines + 10_000) {
        let natural = match life {
            Life::Pending => Some(created + script.pending_for),
            Life::Running if next_line < lines => {
                let at = script.run_for.mul_f64(next_line as f64 / lines as f64);
                Some(started + at)
            }
            Life::Running => script.exit_code.map(|_| started + script.run_for),
            Life::Exited => None,
        };
        let killing = kill_at.is_some_and(|k| natural.is_none_or(|n| k <= n));
        let until = if killing { kill_at } else { natural };
        match wait(&mut kill, until).await {
            Wake::Gone => return,
            Wake::Spurious => {}
            Wake::Killed(deadline) => {
                let honours = life != Life::Running || !script.ignore_sigterm;
                let at = if honours {
                    deadline.min(Instant::now() + SIGTERM_EXIT)
                } else {
                    deadline
                };
                kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
            }
            Wake::Elapsed if killing => {
                let mut st = lock(&shared);
                if life == Life::Running {
                    let code = if script.ignore_sigterm { 137 } else { 143 };
                    if !st.kubelet_exit(&key, &uid, code, started) {
                        return;
                    }
                    life = Life::Exited;
                    kill_at = Some(Instant::now() + KUBELET_CONFIRM);
                } else {
                    st.kubelet_remove(&key, &uid);
                    return;
                }
            }
            Wake::Elapsed => {
                let mut st = lock(&shared);
                let alive = match life {
                    Life::Pending => {
                        started = Instant::now();
                        life = Life::Running;
                        st.kubelet_start(&key, &uid)
                    }
                    Life::Running if next_line < lines => {
                        next_line += 1;
                        st.kubelet_log(&uid, &script.log[next_line - 1])
                    }
                    Life::Running => {
                        life = Life::Exited;
                        // Already being deleted: the kubelet removes the pod
                        // as soon as its container is done.
                        kill_at = kill_at.map(|k| k.min(Instant::now() + KUBELET_CONFIRM));
                        st.kubelet_exit(&key, &uid, script.exit_code.unwrap_or(0), started)
                    }
                    Life::Exited => true,
                };
                if !alive {
                    return;
                }
            }
        }
    }
}

impl State {
    /// The stored pod at `key` if it is still the one with `uid`.
    pub(crate) fn live_pod(&self, key: &Key, uid: &str) -> bool {
        self.objects.get(key).is_some_and(|o| o.uid() == uid)
    }

    /// Syncs the Job controlling a pod, if any.
    pub(crate) fn sync_owner(&mut self, pod: &Pod) {
        let Some(owner) = controller_uid(pod) else {
            return;
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let job = self
            .objects
            .values()
            .find(|o| o.kind() == Kind::Job && o.uid() == owner)
            .map(|o| o.name().to_string());
        if let Some(name) = job {
            self.sync_job(&ns, &name);
        }
    }

    /// The kubelet saw the container start.
    fn kubelet_start(&mut self, key: &Key, uid: &str) -> bool {
        if !self.live_pod(key, uid) {
            return false;
        }
        let state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..Default::default()
        };
        let pod = self.update(key, |o| {
            if let Obj::Pod(p) = o {
                set_pod_state(p, "Running", state);
            }
        });
        if let Some(rt) = self.pods_rt.get_mut(uid) {
            rt.started = true;
        }
        if let Some(Obj::Pod(p)) = pod {
            self.sync_owner(&p);
        }
        true
    }

    /// The container wrote a log line.
    fn kubelet_log(&mut self, uid: &str, line: &str) -> bool {
        let Some(rt) = self.pods_rt.get_mut(uid) else {
            return false;
        };
        rt.log.push((Timestamp::now(), line.to_string()));
        rt.log_tx.send_replace(());
        true
    }

    /// The container exited with `code`.
    fn kubelet_exit(&mut self, key: &Key, uid: &str, code: i32, started: Instant) -> bool {
        if !self.live_pod(key, uid) {
            return false;
        }
        let started_at =
            Timestamp::now() - SignedDuration::try_from(started.elapsed()).unwrap_or_default();
        let state = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.to_string()),
                started_at: Some(Time(started_at)),
                finished_at: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let phase = if code == 0 { "Succeeded" } else { "Failed" };
        let pod = self.update(key, |o| {
            if let Obj::Pod(p) = o {
                set_pod_state(p, phase, state);
            }
        });
        if let Some(rt) = self.pods_rt.get_mut(uid) {
            rt.terminated = true;
            rt.log_tx.send_replace(());
        }
        if let Some(Obj::Pod(p)) = pod {
            self.sync_owner(&p);
        }
        true
    }

    /// The kubelet confirmed the deletion: the pod goes.
    fn kubelet_remove(&mut self, key: &Key, uid: &str) {
        if self.live_pod(key, uid) {
            if let Some(Obj::Pod(p)) = self.remove_pod(key) {
                self.sync_owner(&p);
            }
        }
    }
}
