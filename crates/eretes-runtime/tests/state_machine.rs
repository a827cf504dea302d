//! The task state machine on a live cluster (embedded store, paused time):
//! task commands, checkpoints across a failover, the error policy, commands
//! queued while nobody runs the task, and store failures while loading state.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, keys_under, Cluster, TTL};
use eretes_protocol::{
    now_ms, Coordinator, MachineState, Outcome, ProtocolError, StateRecord, TaskCommand, TaskId,
    TaskState,
};
use eretes_runtime::balancer::DumbBalancer;
use eretes_runtime::{
    Checkpointer, ErrorPolicy, Node, StateContext, StateMachine, StatefulHandler, Step,
};
use eretes_store::embedded::EmbeddedStore;
use eretes_store::faults::FaultyStore;
use eretes_store::{PutRequest, Store};
use serde_json::json;

/// When the `tick` probe ran (one test uses it).
static TICKS: Mutex<Vec<tokio::time::Instant>> = Mutex::new(Vec::new());

/// What the probe saw of one run.
#[derive(Debug, Clone)]
struct Seen {
    task: String,
    node: String,
    epoch: i64,
    checkpoint: Option<String>,
}

/// A stateful handler steered by the task's `mode` property:
/// * `count` (default): saves checkpoints `1`, `2`, … (continuing from the
///   one it received) once a second until stopped;
/// * `flaky`: reports an error at once, every time;
/// * `panic`: panics, every time;
/// * `forever`: asks to sleep for `Duration::MAX`;
/// * `fail-twice`: reports an error on its first two tries, then completes;
/// * `nap`: asks to sleep 5 s on its first run, then completes.
struct Probe {
    observer: Arc<common::Observer>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The checkpointer of the newest run, kept to write with it late.
    checkpointers: Arc<Mutex<Vec<Checkpointer>>>,
}

#[async_trait::async_trait]
impl StatefulHandler for Probe {
    async fn run(&self, ctx: StateContext) -> Step {
        let task = &ctx.task;
        let _run = self
            .observer
            .start(task.id.as_str(), task.node.as_str(), task.epoch);
        let checkpoint = ctx
            .checkpoint
            .as_ref()
            .map(|c| String::from_utf8(c.clone()).unwrap());
        self.seen.lock().unwrap().push(Seen {
            task: task.id.to_string(),
            node: task.node.to_string(),
            epoch: task.epoch,
            checkpoint: checkpoint.clone(),
        });
        self.checkpointers
            .lock()
            .unwrap()
            .push(ctx.checkpointer.clone());
        let properties = task.task.spec.properties.value();
        let mode = properties["mode"].as_str().unwrap_or("count");
        match mode {
            "flaky" => Step::Error("boom".into()),
            "panic" => panic!("probe panic"),
            "forever" => Step::Sleep(Duration::MAX),
            "fail-twice" if ctx.recent_errors < 2 => {
                Step::Error(format!("try {}", ctx.recent_errors + 1))
            }
            "fail-twice" => Step::Complete(json!({"tries": ctx.recent_errors + 1})),
            "nap" if checkpoint.is_none() => {
                ctx.checkpointer.save(b"napped".to_vec()).await.unwrap();
                Step::Sleep(Duration::from_secs(5))
            }
            "nap" => Step::Complete(json!("rested")),
            "tick" => loop {
                // Notes when it is polled, every 100 ms, until stopped.
                tokio::select! {
                    _ = task.cancel.cancelled() => return Step::Release,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        TICKS.lock().unwrap().push(tokio::time::Instant::now());
                    }
                }
            },
            _ => {
                let mut n: u64 = checkpoint.map_or(0, |c| c.parse().unwrap());
                loop {
                    tokio::select! {
                        _ = task.cancel.cancelled() => return Step::Release,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            n += 1;
                            if ctx.checkpointer.save(n.to_string().into_bytes()).await.is_err() {
                                return Step::Release;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A cluster whose nodes run [`Probe`] inside a [`StateMachine`].
struct Machines {
    cluster: Cluster,
    seen: Arc<Mutex<Vec<Seen>>>,
    checkpointers: Arc<Mutex<Vec<Checkpointer>>>,
    policy: ErrorPolicy,
}

impl Machines {
    fn new(store: Arc<dyn Store>) -> Self {
        Machines {
            cluster: Cluster::new(store),
            seen: Arc::default(),
            checkpointers: Arc::default(),
            policy: ErrorPolicy {
                max_errors: 3,
                window: Duration::from_secs(3600),
                first_backoff: Duration::from_secs(1),
                longest_backoff: Duration::from_secs(60),
            },
        }
    }

    async fn start(&mut self, name: &str, store: Arc<dyn Store>) {
        let probe = Probe {
            observer: self.cluster.observer.clone(),
            seen: self.seen.clone(),
            checkpointers: self.checkpointers.clone(),
        };
        // The machine reaches the store the way its node does.
        let coordinator = Coordinator::new(store.clone(), self.cluster.ns.clone());
        let machine = StateMachine::new(probe, coordinator).with_error_policy(self.policy);
        let node = Node::start(
            store,
            self.cluster.config(name),
            Arc::new(machine),
            Box::new(DumbBalancer),
        )
        .await
        .unwrap();
        self.cluster.nodes.insert(name.to_string(), node);
    }

    async fn command(&self, id: &str, command: TaskCommand) {
        self.cluster
            .coordinator
            .send_task_command(&TaskId::new(id).unwrap(), &command)
            .await
            .unwrap();
    }

    async fn state(&self, id: &str) -> TaskState {
        self.view(id).await.state
    }

    async fn view(&self, id: &str) -> eretes_protocol::TaskView {
        self.cluster
            .coordinator
            .task_view(&TaskId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap()
    }

    async fn wait_state(&self, id: &str, want: TaskState, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let state = self.state(id).await;
            if state == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} is {state:?}, not {want:?}, after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Task `id`'s result, waiting up to 20 s of virtual time for it.
    async fn result(&self, id: &str) -> eretes_protocol::ResultRecord {
        let id = TaskId::new(id).unwrap();
        for _ in 0..200 {
            if let Some(result) = self.cluster.coordinator.result(&id).await.unwrap() {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no result for {id} within 20 s");
    }

    fn runs_of(&self, id: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.task == id)
            .cloned()
            .collect()
    }

    fn running(&self, id: &str) -> bool {
        self.cluster
            .observer
            .runs()
            .iter()
            .any(|r| r.task == id && r.ended.is_none())
    }

    async fn queued(&self, id: &str) -> usize {
        let ns = &self.cluster.ns;
        keys_under(
            self.cluster.store.as_ref(),
            &ns.task_commands(&TaskId::new(id).unwrap()),
        )
        .await
    }
}

fn embedded() -> Arc<dyn Store> {
    EmbeddedStore::new()
}

/// Node `a` on an embedded store.
async fn one_node() -> (Arc<dyn Store>, Machines) {
    let store = embedded();
    let mut machines = Machines::new(store.clone());
    machines.start("a", store.clone()).await;
    (store, machines)
}

/// Node `a` on an embedded store, running task `job` (mode `count`).
async fn one_node_running_job() -> (Arc<dyn Store>, Machines) {
    let (store, machines) = one_node().await;
    machines.cluster.submit("job", json!({})).await;
    eventually("job runs", Duration::from_secs(5), || {
        machines.running("job")
    })
    .await;
    (store, machines)
}

#[tokio::test(start_paused = true)]
async fn pause_resume_sleep_and_kill_steer_a_running_task_through_the_store() {
    let (store, machines) = one_node_running_job().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    machines.command("job", TaskCommand::Pause).await;
    machines
        .wait_state("job", TaskState::Paused, Duration::from_secs(5))
        .await;
    assert!(!machines.running("job"), "pausing stops the work");
    let view = machines.view("job").await;
    assert_eq!(
        view.node.as_ref().map(|n| n.as_str()),
        Some("a"),
        "still owned"
    );
    assert_eq!(machines.queued("job").await, 0, "the command was taken");
    // Paused stays paused: time passes, nothing runs.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!machines.running("job"));
    assert_eq!(machines.runs_of("job").len(), 1);

    machines.command("job", TaskCommand::Resume).await;
    eventually("job runs again", Duration::from_secs(5), || {
        machines.running("job")
    })
    .await;
    assert_eq!(machines.state("job").await, TaskState::Running);
    let runs = machines.runs_of("job");
    assert_eq!(runs.len(), 2);
    assert_eq!(
        runs[1].checkpoint.as_deref(),
        Some("2"),
        "the resumed run starts from the checkpoint saved before the pause"
    );

    let until_ms = now_ms() + 20_000;
    machines
        .command("job", TaskCommand::Sleep { until_ms })
        .await;
    machines
        .wait_state("job", TaskState::Sleeping, Duration::from_secs(5))
        .await;
    assert!(!machines.running("job"), "sleeping stops the work");
    assert_eq!(machines.view("job").await.sleeping_until_ms, Some(until_ms));
    let slept_at = tokio::time::Instant::now();
    eventually("job wakes up", Duration::from_secs(30), || {
        machines.running("job")
    })
    .await;
    let slept = slept_at.elapsed();
    assert!(
        slept >= Duration::from_secs(19) && slept <= Duration::from_secs(21),
        "woke after {slept:?}"
    );
    assert_eq!(machines.state("job").await, TaskState::Running);

    machines.command("job", TaskCommand::Kill).await;
    machines
        .wait_state("job", TaskState::Killed, Duration::from_secs(5))
        .await;
    assert!(!machines.running("job"));
    let id = TaskId::new("job").unwrap();
    let result = machines
        .cluster
        .coordinator
        .result(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result.outcome, Outcome::Killed);
    // Nothing of the machine is left behind.
    let ns = &machines.cluster.ns;
    for key in [ns.state(&id), ns.checkpoint(&id), ns.task_commands(&id)] {
        assert_eq!(keys_under(store.as_ref(), &key).await, 0, "{key}");
    }
    assert_eq!(machines.cluster.observer.overlaps(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_command_the_state_does_not_accept_is_taken_and_changes_nothing() {
    let (store, machines) = one_node_running_job().await;
    // Resume a running task (invalid), and a value that is no command.
    machines.command("job", TaskCommand::Resume).await;
    let garbage = format!(
        "{}zz",
        machines
            .cluster
            .ns
            .task_commands(&TaskId::new("job").unwrap())
    );
    store
        .put(PutRequest::new(
            garbage,
            b"{\"command\":\"explode\"}".to_vec(),
        ))
        .await
        .unwrap();
    eventually_async(&machines, "both commands are taken", |m| async move {
        m.queued("job").await == 0
    })
    .await;
    assert!(machines.running("job"), "the run went on");
    assert_eq!(machines.runs_of("job").len(), 1, "and was not restarted");
    assert_eq!(machines.state("job").await, TaskState::Running);
}

/// Poll an async condition on `machines` for up to 10 s of virtual time.
async fn eventually_async<'a, F, Fut>(machines: &'a Machines, what: &str, condition: F)
where
    F: Fn(&'a Machines) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if condition(machines).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(start_paused = true)]
async fn commands_sent_while_nobody_runs_the_task_apply_in_order_at_its_next_claim() {
    let store = embedded();
    let mut machines = Machines::new(store.clone());
    machines.cluster.submit("later", json!({})).await;
    let until_ms = now_ms() + 3_600_000;
    machines
        .command("later", TaskCommand::Sleep { until_ms })
        .await;
    machines.command("later", TaskCommand::Pause).await;
    assert_eq!(machines.queued("later").await, 2);
    assert_eq!(machines.state("later").await, TaskState::Pending);

    machines.start("a", store.clone()).await;
    // Sleep, then pause: the later command wins, and the work never started.
    machines
        .wait_state("later", TaskState::Paused, Duration::from_secs(5))
        .await;
    assert_eq!(machines.queued("later").await, 0);
    assert!(machines.runs_of("later").is_empty(), "it never ran");

    machines.command("later", TaskCommand::Resume).await;
    eventually("it runs", Duration::from_secs(5), || {
        machines.running("later")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failover_hands_the_latest_checkpoint_on_and_the_old_owners_writes_are_refused() {
    let (store, mut machines) = one_node_running_job().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let id = TaskId::new("job").unwrap();
    let saved = machines.cluster.coordinator.checkpoint(&id).await.unwrap();
    assert_eq!(saved.as_deref(), Some(&b"3"[..]));
    let old = machines.checkpointers.lock().unwrap()[0].clone();

    // a dies abruptly (no release); b takes over after a's lease expires.
    machines.cluster.node("a").kill();
    machines.start("b", store.clone()).await;
    eventually("job runs on b", TTL * 3, || {
        machines.runs_of("job").iter().any(|s| s.node == "b")
    })
    .await;
    let runs = machines.runs_of("job");
    let (first, second) = (&runs[0], &runs[1]);
    assert_eq!(second.node, "b");
    assert!(second.epoch > first.epoch);
    assert_eq!(
        second.checkpoint.as_deref(),
        Some("3"),
        "the new owner starts from the last checkpoint"
    );

    // The old owner's late writes are refused, and change nothing.
    let late = old.save(b"late".to_vec()).await;
    assert!(
        matches!(late, Err(ProtocolError::NotOwner { .. })),
        "{late:?}"
    );
    let stale_state = StateRecord {
        state: MachineState::Paused,
        ..StateRecord::default()
    };
    let late = machines
        .cluster
        .coordinator
        .write_state(&id, first.epoch, &stale_state, None)
        .await;
    assert!(
        matches!(late, Err(ProtocolError::NotOwner { .. })),
        "{late:?}"
    );
    let checkpoint = machines.cluster.coordinator.checkpoint(&id).await.unwrap();
    assert_ne!(checkpoint.as_deref(), Some(&b"late"[..]));
    assert_eq!(machines.state("job").await, TaskState::Running);
    // b goes on counting from where a stopped.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let checkpoint = machines.cluster.coordinator.checkpoint(&id).await.unwrap();
    assert_eq!(checkpoint.as_deref(), Some(&b"4"[..]));
}

#[tokio::test(start_paused = true)]
async fn the_error_policy_backs_off_and_then_fails_the_task() {
    let (_, machines) = one_node().await;
    machines
        .cluster
        .submit("flaky", json!({"mode": "flaky"}))
        .await;
    machines
        .cluster
        .submit("twice", json!({"mode": "fail-twice"}))
        .await;
    machines
        .wait_state("flaky", TaskState::Sleeping, Duration::from_secs(5))
        .await;
    let view = machines.view("flaky").await;
    assert_eq!(view.errors.len(), 1);
    assert_eq!(view.errors[0].message, "boom");

    let coordinator = &machines.cluster.coordinator;
    let result = machines.result("flaky").await;
    assert_eq!(result.outcome, Outcome::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("3 errors") && error.contains("boom"),
        "{error}"
    );
    // Three tries, the second 1 s after the first, the third 2 s after that.
    let starts: Vec<_> = machines
        .cluster
        .observer
        .runs()
        .into_iter()
        .filter(|r| r.task == "flaky")
        .map(|r| r.started)
        .collect();
    assert_eq!(starts.len(), 3);
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert!((1000..1100).contains(&gaps[0]), "{gaps:?}");
    assert!((2000..2100).contains(&gaps[1]), "{gaps:?}");

    let twice = coordinator
        .result(&TaskId::new("twice").unwrap())
        .await
        .unwrap()
        .expect("twice is done");
    assert_eq!(twice.outcome, Outcome::Done);
    assert_eq!(twice.result, json!({"tries": 3}));
}

#[tokio::test(start_paused = true)]
async fn a_handler_may_sleep_and_its_checkpoint_survives_the_nap() {
    let (_, machines) = one_node().await;
    machines.cluster.submit("nap", json!({"mode": "nap"})).await;
    machines
        .wait_state("nap", TaskState::Sleeping, Duration::from_secs(5))
        .await;
    assert_eq!(machines.result("nap").await.result, json!("rested"));
    let runs = machines.runs_of("nap");
    assert_eq!(runs[1].checkpoint.as_deref(), Some("napped"));
}

#[tokio::test(start_paused = true)]
async fn a_store_failure_while_loading_state_releases_the_task_and_loses_nothing() {
    let inner = EmbeddedStore::new();
    let faulty = FaultyStore::new(inner.clone());
    let store: Arc<dyn Store> = inner.clone();
    let mut machines = Machines::new(store.clone());
    let id = TaskId::new("job").unwrap();
    machines.cluster.submit("job", json!({})).await;
    // Its state so far: a checkpoint and a queued command.
    machines.command("job", TaskCommand::Pause).await;
    let checkpoint_key = machines.cluster.ns.checkpoint(&id);
    inner
        .put(PutRequest::new(checkpoint_key, b"41".to_vec()))
        .await
        .unwrap();

    faulty.fail_reads_under(Some("test/states/"));
    machines.start("a", faulty.clone()).await;
    let stats = machines.cluster.node("a").stats().clone();
    eventually(
        "a claimed and released the task",
        Duration::from_secs(5),
        || eretes_runtime::NodeStats::get(&stats.releases) >= 1,
    )
    .await;
    // Released, not ended: the task, its checkpoint and its command are all there.
    assert!(machines
        .cluster
        .coordinator
        .result(&id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(machines.state("job").await, TaskState::Pending);
    assert_eq!(machines.queued("job").await, 1);
    assert_eq!(
        machines
            .cluster
            .coordinator
            .checkpoint(&id)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"41"[..])
    );
    assert!(machines.runs_of("job").is_empty());

    // Once the store answers again the task is claimed again and the queued
    // pause applies.
    faulty.fail_reads_under(None);
    machines
        .wait_state("job", TaskState::Paused, Duration::from_secs(30))
        .await;
    assert_eq!(machines.queued("job").await, 0);
    machines.command("job", TaskCommand::Resume).await;
    eventually("it runs", Duration::from_secs(5), || {
        machines.running("job")
    })
    .await;
    assert_eq!(machines.runs_of("job")[0].checkpoint.as_deref(), Some("41"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_an_error_for_the_policy_not_an_instant_failure() {
    let (_, machines) = one_node().await;
    machines.cluster.submit("p", json!({"mode": "panic"})).await;
    machines
        .wait_state("p", TaskState::Sleeping, Duration::from_secs(5))
        .await;
    let view = machines.view("p").await;
    assert_eq!(view.errors[0].message, "the handler panicked: probe panic");
    let result = machines.result("p").await;
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(machines.runs_of("p").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_state_record_parks_the_task_as_paused_with_the_reason() {
    let store = embedded();
    let mut machines = Machines::new(store.clone());
    machines.cluster.submit("odd", json!({})).await;
    let key = machines.cluster.ns.state(&TaskId::new("odd").unwrap());
    store
        .put(PutRequest::new(key, b"{\"state\": \"dancing\"}".to_vec()))
        .await
        .unwrap();
    machines.start("a", store.clone()).await;
    machines
        .wait_state("odd", TaskState::Paused, Duration::from_secs(5))
        .await;
    let view = machines.view("odd").await;
    assert!(
        view.errors[0]
            .message
            .contains("paused until a resume command"),
        "{:?}",
        view.errors
    );
    assert!(machines.runs_of("odd").is_empty(), "it did not run");
    machines.command("odd", TaskCommand::Resume).await;
    eventually("it runs once resumed", Duration::from_secs(5), || {
        machines.running("odd")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_sleep_to_the_end_of_time_sleeps_and_still_obeys_commands() {
    let (_, machines) = one_node().await;
    machines
        .cluster
        .submit("z", json!({"mode": "forever"}))
        .await;
    machines
        .wait_state("z", TaskState::Sleeping, Duration::from_secs(5))
        .await;
    assert_eq!(machines.view("z").await.sleeping_until_ms, Some(u64::MAX));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(machines.runs_of("z").len(), 1, "still asleep an hour later");
    machines.command("z", TaskCommand::Kill).await;
    assert_eq!(machines.result("z").await.outcome, Outcome::Killed);
}

#[tokio::test(start_paused = true)]
async fn the_work_is_polled_while_slow_commands_are_handled() {
    // A process task's run forwards the fencing deadline and stops to its
    // supervisor only while it is polled: handling a command (store calls
    // that can take seconds) must not stop polling it.
    let inner = EmbeddedStore::new();
    let faulty = FaultyStore::new(inner.clone());
    let mut machines = Machines::new(faulty.clone());
    machines.start("a", faulty.clone()).await;
    machines
        .cluster
        .submit("ticker", json!({"mode": "tick"}))
        .await;
    eventually("ticker runs", Duration::from_secs(5), || {
        machines.running("ticker")
    })
    .await;
    faulty.set_txn_latency(Duration::from_secs(3));
    // Resume of a running task: taken (a 3 s transaction) and discarded,
    // the run goes on.
    machines.command("ticker", TaskCommand::Resume).await;
    let from = tokio::time::Instant::now();
    eventually_async(&machines, "the command is taken", |m| async move {
        m.queued("ticker").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks: Vec<_> = TICKS
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|at| *at >= from)
        .collect();
    assert!(ticks.len() > 20, "{} ticks", ticks.len());
    let longest = ticks
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap();
    assert!(
        longest < Duration::from_secs(1),
        "the run was not polled for {longest:?}"
    );
    assert!(machines.running("ticker"), "the run went on");
}
