//! Routing the view's events to the runs of this node: each run listens
//! for its job's events, and the node's one dispatcher hands each event to
//! the runs it concerns, in store order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};

use eretes_protocol::TaskId;
use tokio::sync::{broadcast, mpsc};

use crate::handle::RunShared;
use crate::ids::{parse_graph_task_id, JobEpoch, JobName};
use crate::node::NodeShared;
use crate::view::{GraphEvent, SeenMeta};

/// What a run's event loop is told, in order.
pub(crate) enum RunEvent {
    Epoch(JobEpoch, bool),
    Meta(u32, String, SeenMeta),
    Owner(TaskId, bool),
    Resync,
}

/// A run waiting for events: where to queue them, and the run once built
/// (events can come before it is).
pub(crate) struct Listener {
    id: u64,
    index: u32,
    queue: mpsc::UnboundedSender<RunEvent>,
    run: Arc<OnceLock<Arc<RunShared>>>,
}

/// A run's place among the listeners; leaves it when dropped (also when
/// the run's future is dropped by a kill).
pub(crate) struct Listening {
    node: Arc<NodeShared>,
    job: JobName,
    id: u64,
    run: Arc<OnceLock<Arc<RunShared>>>,
}

impl Listening {
    /// The run is built: epoch moves reach it at once from now on.
    pub(crate) fn run_is(&self, run: &Arc<RunShared>) {
        let _ = self.run.set(run.clone());
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let mut listeners = self.node.listeners.lock().expect("not poisoned");
        if let Some(runs) = listeners.get_mut(&self.job) {
            runs.retain(|listener| listener.id != self.id);
            if runs.is_empty() {
                listeners.remove(&self.job);
            }
        }
    }
}

impl NodeShared {
    /// Queue the events of `job` that task `index` cares about on `queue`.
    pub(crate) fn listen(
        self: &Arc<Self>,
        job: &JobName,
        index: u32,
        queue: mpsc::UnboundedSender<RunEvent>,
    ) -> Listening {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        let run = Arc::new(OnceLock::new());
        self.listeners
            .lock()
            .expect("not poisoned")
            .entry(job.clone())
            .or_default()
            .push(Listener {
                id,
                index,
                queue,
                run: run.clone(),
            });
        Listening {
            node: self.clone(),
            job: job.clone(),
            id,
            run,
        }
    }
}

/// Hand the view's events to the runs they concern, in store order: an
/// epoch move to every run of the job (moving its scope at once, which ends
/// the old epoch's data requests even while a callback waits on one), a
/// meta to the runs its topology says receive it, an owner change to the
/// runs it is a neighbour of. Each run is woken only for its own events.
pub(crate) async fn dispatch(node: Weak<NodeShared>, mut events: broadcast::Receiver<GraphEvent>) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => GraphEvent::Resync,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(node) = node.upgrade() else { return };
        let listeners = node.listeners.lock().expect("not poisoned");
        match event {
            GraphEvent::Epoch(job, record) => {
                if record.shutdown {
                    node.drop_backups_of(&job);
                }
                for listener in listeners.get(&job).into_iter().flatten() {
                    if let Some(run) = listener.run.get() {
                        run.move_to(record.epoch, record.shutdown);
                    }
                    let _ = listener
                        .queue
                        .send(RunEvent::Epoch(record.epoch, record.shutdown));
                }
            }
            GraphEvent::Meta {
                job,
                from,
                link,
                meta,
            } => {
                for listener in listeners.get(&job).into_iter().flatten() {
                    let receives = listener.run.get().is_none_or(|run| {
                        run.topology
                            .neighbours(&link, from, meta.record.epoch)
                            .contains(&listener.index)
                    });
                    if receives {
                        let event = RunEvent::Meta(from, link.clone(), meta.clone());
                        let _ = listener.queue.send(event);
                    }
                }
            }
            GraphEvent::Owner(id, owner) => {
                let Some((job, neighbour)) = parse_graph_task_id(&id) else {
                    continue;
                };
                for listener in listeners.get(&job).into_iter().flatten() {
                    let concerned = listener.run.get().is_none_or(|run| {
                        let epoch = *run.entered.lock().expect("not poisoned");
                        run.topology.links().iter().any(|link| {
                            run.topology
                                .neighbours(link, listener.index, epoch)
                                .contains(&neighbour)
                        })
                    });
                    if concerned {
                        let _ = listener
                            .queue
                            .send(RunEvent::Owner(id.clone(), owner.is_some()));
                    }
                }
            }
            GraphEvent::Backup(id, holder, record, revision) if holder == node.name => {
                node.backup_record_changed(&id, record, revision);
            }
            GraphEvent::Backup(..) => {}
            GraphEvent::Resync => {
                node.reconcile_backups();
                // Events may have been absorbed by the re-read: move every
                // run's epoch scope to what the view says now, at once, as
                // an epoch event would have.
                for (job, listeners) in listeners.iter() {
                    let record = node.view.epoch(job);
                    for listener in listeners {
                        if let (Some(run), Some(record)) = (listener.run.get(), record) {
                            run.move_to(record.epoch, record.shutdown);
                        }
                        let _ = listener.queue.send(RunEvent::Resync);
                    }
                }
            }
        }
    }
}
