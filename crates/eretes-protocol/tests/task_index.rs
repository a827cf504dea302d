//! The task index kept current by watch events agrees with one read from
//! scratch after any sequence of writes, deletes, malformed values and lease
//! revocations; and its pages, filtered or not, are the snapshot's tasks in
//! id order.

use std::sync::Arc;
use std::time::Duration;

use eretes_protocol::*;
use eretes_store::embedded::EmbeddedStore;
use eretes_store::{DeleteRequest, KeyRange, PutRequest, Store, StoreExt};
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::json;

const IDS: [&str; 4] = ["a", "b", "c", "d"];
const NODES: [&str; 2] = ["n1", "n2"];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Task,
    Owner,
    Result,
    State,
    Node,
}

#[derive(Debug, Clone)]
enum Op {
    /// Put a record of `kind` for id (or node) `which`, in variant `variant`
    /// (the last variant is garbage), under the current lease or none.
    Put {
        kind: Kind,
        which: usize,
        variant: usize,
        leased: bool,
    },
    Delete {
        kind: Kind,
        which: usize,
    },
    /// A key under an indexed prefix that is no valid id.
    BadKey,
    /// Revoke the current lease (deleting what it holds) and grant another.
    Revoke,
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(Kind::Task),
        Just(Kind::Owner),
        Just(Kind::Result),
        Just(Kind::State),
        Just(Kind::Node),
    ];
    prop_oneof![
        6 => (kind.clone(), 0..IDS.len(), 0..4usize, any::<bool>()).prop_map(
            |(kind, which, variant, leased)| Op::Put { kind, which, variant, leased }
        ),
        2 => (kind, 0..IDS.len()).prop_map(|(kind, which)| Op::Delete { kind, which }),
        1 => Just(Op::BadKey),
        1 => Just(Op::Revoke),
    ]
}

fn key(ns: &Namespace, kind: Kind, which: usize) -> String {
    let id = TaskId::new(IDS[which]).unwrap();
    match kind {
        Kind::Task => ns.task(&id),
        Kind::Owner => ns.owner(&id),
        Kind::Result => ns.result(&id),
        Kind::State => ns.state(&id),
        Kind::Node => ns.node(&NodeName::new(NODES[which % NODES.len()]).unwrap()),
    }
}

fn value(kind: Kind, variant: usize) -> Vec<u8> {
    if variant == 3 {
        return b"{not json".to_vec();
    }
    let group = ["g1", "g2", "g1"][variant];
    let node = NODES[variant % NODES.len()];
    let record = match kind {
        Kind::Task => json!({"group": group, "properties": {"v": variant}}),
        Kind::Owner => json!({"node": node, "group": group}),
        Kind::Result => serde_json::to_value(ResultRecord {
            outcome: [Outcome::Done, Outcome::Failed, Outcome::Killed][variant],
            result: json!(variant),
            error: (variant == 1).then(|| "boom".to_string()),
            spec: TaskSpec::new(GroupName::new(group).unwrap(), json!(null)),
            epoch: 3,
            node: NodeName::new(node).unwrap(),
            runs: RunRecord::default(),
            finished_at_ms: 1,
        })
        .unwrap(),
        Kind::State => [
            json!({"state": "paused"}),
            json!({"state": "sleeping", "until_ms": 5}),
            json!({"state": "fault", "errors": [{"at_ms": 1, "message": "x"}]}),
        ][variant]
            .clone(),
        Kind::Node => json!({"groups": [group], "started_at_ms": 1}),
    };
    serde_json::to_vec(&record).unwrap()
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("ix").unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let start = store.current_revision().await.unwrap();
    let mut index = TaskIndex::new(ns.clone(), start);
    let mut events = coordinator.watch_namespace(start + 1).await.unwrap();
    let mut lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
    for op in ops {
        match op {
            Op::Put {
                kind,
                which,
                variant,
                leased,
            } => {
                let mut put = PutRequest::new(key(&ns, kind, which), value(kind, variant));
                if leased {
                    put = put.with_lease(lease);
                }
                store.put(put).await.unwrap();
            }
            Op::Delete { kind, which } => {
                let range = KeyRange::key(key(&ns, kind, which));
                store.delete(DeleteRequest::new(range)).await.unwrap();
            }
            Op::BadKey => {
                let put = PutRequest::new(format!("{}not an id!", ns.tasks_prefix()), "{}");
                store.put(put).await.unwrap();
            }
            Op::Revoke => {
                store.lease_revoke(lease).await.unwrap();
                lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
            }
        }
    }
    let end = store.current_revision().await.unwrap();
    while index.revision() < end {
        let batch = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the watch delivers every write")
            .unwrap()
            .unwrap();
        batch.iter().for_each(|event| index.apply(event));
    }
    let fresh = coordinator.read_index().await.unwrap();
    let (kept, read) = (index.to_snapshot(), fresh.to_snapshot());
    prop_assert_eq!(&kept.tasks, &read.tasks);
    prop_assert_eq!(&kept.nodes, &read.nodes);
    prop_assert_eq!(kept.malformed, read.malformed);
    prop_assert_eq!(kept.revision, read.revision);

    // Counts by group and state, recounted from the views.
    let mut counts = std::collections::BTreeMap::new();
    for task in read.tasks.values() {
        *counts.entry((task.group.clone(), task.state)).or_default() += 1;
    }
    prop_assert_eq!(index.counts(), counts);

    // Running counts, recounted from the views.
    for node in index.nodes() {
        let live = read
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal() && t.node.as_ref() == Some(&node.name))
            .count();
        prop_assert_eq!(node.running, live, "running on {}", node.name);
        // And per group, summing to the total.
        let mut by_group = std::collections::BTreeMap::new();
        for task in read.tasks.values() {
            if !task.state.is_terminal() && task.node.as_ref() == Some(&node.name) {
                *by_group.entry(task.group.clone()).or_insert(0usize) += 1;
            }
        }
        prop_assert_eq!(&node.running_by_group, &by_group, "groups on {}", node.name);
    }

    // A task's position is its view's state, node and epoch.
    for id in IDS {
        let id: TaskId = id.parse().unwrap();
        let position = index.position(&id);
        let view = read.tasks.get(&id);
        prop_assert_eq!(position.as_ref().map(|p| p.state), view.map(|v| v.state));
        if let (Some(position), Some(view)) = (position, view) {
            let owned = (!view.state.is_terminal()).then(|| view.node.clone().zip(view.epoch));
            prop_assert_eq!(position.owner, owned.flatten(), "position of {}", id);
        }
    }

    // Pages of two, filtered or not, are the snapshot's tasks in order; so
    // are pages that a byte budget cuts to one task each (never to none).
    for (state, group, max_bytes) in [None, Some(TaskState::Running), Some(TaskState::Done)]
        .into_iter()
        .flat_map(|state| [None, Some("g1".to_string())].map(|group| (state, group)))
        .flat_map(|(state, group)| [usize::MAX, 1].map(|bytes| (state, group.clone(), bytes)))
    {
        let mut query = TaskQuery::new(2);
        query.state = state;
        query.group = group.clone();
        query.max_bytes = max_bytes;
        let mut paged = Vec::new();
        for _ in 0..=IDS.len() {
            let (tasks, next) = index.page(&query);
            prop_assert!(
                !tasks.is_empty() || next.is_none(),
                "an empty page says more follow"
            );
            prop_assert!(
                max_bytes == usize::MAX || tasks.len() <= 1,
                "over the byte budget"
            );
            paged.extend(tasks);
            match next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        let expected: Vec<TaskView> = read
            .tasks
            .values()
            .filter(|t| state.is_none_or(|s| t.state == s))
            .filter(|t| group.as_deref().is_none_or(|g| t.group.as_str() == g))
            .cloned()
            .collect();
        prop_assert_eq!(paged, expected);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_watch_kept_index_equals_a_fresh_read(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops))?;
    }
}

#[tokio::test]
async fn views_are_built_as_the_records_say() {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    let ns = Namespace::new("ix").unwrap();
    let coordinator = Coordinator::new(store.clone(), ns.clone());
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap().id;
    for (kind, which, variant) in [
        (Kind::Task, 0, 0),   // a: pending
        (Kind::Task, 1, 0),   // b: running on n1
        (Kind::Owner, 1, 0),  //
        (Kind::Task, 2, 1),   // c: paused, group g2
        (Kind::State, 2, 0),  //
        (Kind::Result, 3, 1), // d: failed
    ] {
        let put = PutRequest::new(key(&ns, kind, which), value(kind, variant));
        store.put(put).await.unwrap();
    }
    let node = PutRequest::new(key(&ns, Kind::Node, 0), value(Kind::Node, 0)).with_lease(lease);
    store.put(node).await.unwrap();
    let ghost = PutRequest::new(key(&ns, Kind::Node, 1), value(Kind::Node, 0));
    store.put(ghost).await.unwrap();

    let index = coordinator.read_index().await.unwrap();
    let (tasks, next) = index.page(&TaskQuery::new(10));
    assert_eq!(next, None);
    let states: Vec<(&str, TaskState)> = tasks.iter().map(|t| (t.id.as_str(), t.state)).collect();
    assert_eq!(
        states,
        [
            ("a", TaskState::Pending),
            ("b", TaskState::Running),
            ("c", TaskState::Paused),
            ("d", TaskState::Failed)
        ]
    );
    assert_eq!(tasks[1].node.as_ref().map(|n| n.as_str()), Some("n1"));
    assert_eq!(tasks[3].error.as_deref(), Some("boom"));
    // The node record without a lease is no live node, and is counted.
    let nodes = index.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].name.as_str(), nodes[0].running), ("n1", 1));
    assert_eq!(index.malformed(), 1);
    assert_eq!(index.task_count(), 4);
}
