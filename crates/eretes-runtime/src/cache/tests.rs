//! The cache's unit tests: what each key change does to the view.

use super::*;
use eretes_protocol::machine::MAX_CHECKPOINT_BYTES;
use eretes_protocol::{encode, TaskKeys, TaskRecord, TaskSpec};

pub(super) fn kv(key: &str, value: Vec<u8>, create: Revision, modr: Revision) -> KeyValue {
    KeyValue {
        key: key.into(),
        value,
        create_revision: create,
        mod_revision: modr,
        version: 1,
        lease: 0,
    }
}

/// The groups the tests' nodes serve.
pub(super) fn served() -> Vec<GroupName> {
    vec![GroupName::default(), GroupName::new("other").unwrap()]
}

pub(super) fn task_value(group: &str) -> Vec<u8> {
    encode(&TaskRecord {
        spec: TaskSpec::new(GroupName::new(group).unwrap(), serde_json::Value::Null),
        submitted_at_ms: 0,
    })
}

/// Node `me`'s cache holding one task, `a`, submitted at revision 2.
fn cache_with_task_a() -> (Namespace, Cache, TaskId) {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let id = TaskId::new("a").unwrap();
    cache.apply_put(&kv(&ns.task(&id), task_value("default"), 2, 2));
    (ns, cache, id)
}

#[test]
fn counts_follow_owners_and_tasks() {
    let ns = Namespace::new("t").unwrap();
    let me = NodeName::new("me").unwrap();
    let other = NodeName::new("other").unwrap();
    let mut cache = Cache::new(ns.clone(), me.clone(), &served());
    let g = GroupName::default();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let id = TaskId::new(*id).unwrap();
        let rev = i as Revision + 2;
        cache.apply_put(&kv(&ns.task(&id), task_value("default"), rev, rev));
    }
    assert_eq!(cache.view.group(&g).unowned, 3);
    let a = TaskId::new("a").unwrap();
    let owner = encode(&OwnerRecord {
        node: other.clone(),
        group: g.clone(),
    });
    let owner_kv = kv(&ns.owner(&a), owner, 10, 10);
    cache.apply_put(&owner_kv);
    assert_eq!(cache.view.group(&g).unowned, 2);
    assert_eq!(cache.view.group(&g).owned_by(&other), 1);
    // Another node's task is counted, not kept.
    assert!(cache.task(&a).is_none() && !cache.entries.contains_key(&a));
    assert_eq!(
        cache.unowned(&g).map(|t| t.as_str()).collect::<Vec<_>>(),
        ["b", "c"]
    );
    cache.set_mine(&TaskId::new("b").unwrap(), &g, 0);
    assert_eq!(cache.view.group(&g).owned_by(&me), 1);
    cache.clear_tentative(&TaskId::new("b").unwrap());
    assert_eq!(cache.view.group(&g).owned_by(&me), 0);
    // Its owner goes (the watch's delete, with the record it removed): the
    // task is unowned again, unread, and ranks as if submitted when it was
    // claimed, until its read puts it in its place.
    let d = TaskId::new("d").unwrap();
    cache.apply_put(&kv(&ns.task(&d), task_value("default"), 11, 11));
    cache.apply_delete(&ns.owner(&a), 12, Some(&owner_kv));
    assert_eq!(cache.view.group(&g).unowned, 4);
    assert_eq!(cache.view.group(&g).owned_by(&other), 0);
    assert_eq!(
        cache.unowned(&g).map(|t| t.as_str()).collect::<Vec<_>>(),
        ["b", "c", "a", "d"]
    );
    assert!(cache.is_unread(&a) && cache.claim_basis(&a).is_none());
    // Read, it is claimable, in its place among the oldest.
    let keys = TaskKeys {
        task: Some(kv(&ns.task(&a), task_value("default"), 2, 2)),
        owner: None,
        run: Some(kv(&ns.run(&a), encode(&RunRecord::default()), 10, 10)),
        revision: 12,
    };
    assert!(cache.apply_read_back(&a, &keys).is_some());
    let basis = cache.claim_basis(&a).expect("read and claimable");
    assert_eq!((basis.task_revision, basis.run_revision), (2, 10));
    assert_eq!(
        cache.unowned(&g).map(|t| t.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d"]
    );
    cache.apply_delete(&ns.task(&d), 13, None);
    cache.apply_delete(&ns.task(&a), 13, None);
    assert_eq!(cache.view.group(&g).unowned, 2);
    assert_eq!(cache.view.group(&g).total(), 2);
}

#[test]
fn a_listing_keeps_nothing_per_task_another_node_runs_but_what_the_watch_must_find() {
    let ns = Namespace::new("t").unwrap();
    let cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let g = GroupName::default();
    let other = NodeName::new("other").unwrap();
    let (a, b) = (TaskId::new("a").unwrap(), TaskId::new("b").unwrap());
    let owner = encode(&OwnerRecord {
        node: other.clone(),
        group: g.clone(),
    });
    let run = encode(&RunRecord {
        claims: 1,
        takeovers: 0,
        open: true,
        node: Some(other.clone()),
    });
    // Tasks, then owners, then runs: `a` listed and owned; `b` submitted
    // after tasks were read, and claimed before owners were.
    let listing = [
        kv(&ns.task(&a), task_value("default"), 2, 2),
        kv(&ns.owner(&a), owner.clone(), 3, 3),
        kv(&ns.owner(&b), owner.clone(), 6, 6),
        kv(&ns.run(&a), run.clone(), 3, 3),
        kv(&ns.run(&b), run.clone(), 6, 6),
    ];
    let (mut cache, _) = cache.rebuild(&listing, 0);
    assert!(!cache.entries.contains_key(&a), "another node runs a");
    assert_eq!(cache.view.group(&g).owned_by(&other), 2);
    assert_eq!(cache.view.group(&g).unowned, 0);
    // The watch brings b's put: owned, no candidate.
    cache.apply_put(&kv(&ns.task(&b), task_value("default"), 5, 5));
    assert_eq!(cache.unowned(&g).count(), 0);
    assert_eq!(cache.view.group(&g).total(), 2);
    // b's owner goes: unowned, and read again before a claim (the watch
    // does not carry the run record its end rewrote).
    let change = cache.apply_delete(&ns.owner(&b), 7, Some(&listing[2]));
    assert!(
        matches!(&change, Change::OwnerChanged { freed: Some(group), .. } if *group == g),
        "{change:?}"
    );
    assert_eq!(cache.view.group(&g).owned_by(&other), 1);
    assert_eq!(cache.view.group(&g).unowned, 1);
    assert!(cache.is_unread(&b) && cache.claim_basis(&b).is_none());
    let released = RunRecord {
        open: false,
        ..decode::<RunRecord>("run", "r", &run).unwrap()
    };
    let read = TaskKeys {
        task: Some(kv(&ns.task(&b), task_value("default"), 5, 5)),
        owner: None,
        run: Some(kv(&ns.run(&b), encode(&released), 6, 7)),
        revision: 7,
    };
    cache.apply_read_back(&b, &read).expect("applied");
    let basis = cache.claim_basis(&b).expect("claimable once read");
    assert_eq!((basis.task_revision, basis.run_revision), (5, 7));
    assert_eq!((basis.run.claims, basis.run.open), (1, false));
}

#[test]
fn a_task_that_ends_under_another_node_leaves_nothing_unread() {
    let (ns, mut cache, id) = cache_with_task_a();
    let g = GroupName::default();
    let other = NodeName::new("other").unwrap();
    let owner = encode(&OwnerRecord {
        node: other.clone(),
        group: g.clone(),
    });
    let owner_kv = kv(&ns.owner(&id), owner, 3, 3);
    cache.apply_put(&owner_kv);
    // Its end deletes the task, then its owner record, in one revision.
    cache.apply_delete(&ns.task(&id), 9, None);
    cache.apply_delete(&ns.owner(&id), 9, Some(&owner_kv));
    assert!(cache.entries.is_empty());
    assert_eq!(cache.view.group(&g).total(), 0);
}

/// The keys of `id` as read at `revision`: its task record (created at
/// `task`, if any), another node's owner record (created at `owner`, if
/// any), no run record.
fn read_at(
    ns: &Namespace,
    id: &TaskId,
    task: Option<Revision>,
    owner: Option<Revision>,
    revision: Revision,
) -> TaskKeys {
    let owner_value = encode(&OwnerRecord {
        node: NodeName::new("other").unwrap(),
        group: GroupName::default(),
    });
    TaskKeys {
        task: task.map(|rev| kv(&ns.task(id), task_value("default"), rev, rev)),
        owner: owner.map(|rev| kv(&ns.owner(id), owner_value.clone(), rev, rev)),
        run: None,
        revision,
    }
}

#[test]
fn a_read_back_never_undoes_what_the_watch_brought_since() {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let g = GroupName::default();
    let other = NodeName::new("other").unwrap();
    let id = TaskId::new("a").unwrap();
    let task_kv = kv(&ns.task(&id), task_value("default"), 2, 2);
    let claimed = read_at(&ns, &id, Some(2), Some(5), 6);
    let owner_kv = claimed.owner.clone().unwrap();
    cache.apply_put(&task_kv);
    // This node's claim is in flight when another node's wins; the lost
    // claim's read-back (with that owner) arrives before the watch's put.
    cache.set_mine(&id, &g, 0);
    cache.clear_tentative(&id);
    assert_eq!(cache.apply_read_back(&id, &claimed), Some(vec![]));
    assert!(!cache.entries.contains_key(&id));
    assert_eq!(cache.view.group(&g).unowned, 0);
    // The watch's put counts it, once.
    cache.apply_put(&owner_kv);
    assert_eq!(cache.view.group(&g).owned_by(&other), 1);
    assert_eq!(cache.view.group(&g).total(), 1);
    // Its owner's lease expires: unread. A read older than that delete
    // (it still saw the owner) changes nothing, and says so.
    cache.apply_delete(&ns.owner(&id), 8, Some(&owner_kv));
    assert!(cache.is_unread(&id));
    assert_eq!(cache.apply_read_back(&id, &claimed), None);
    assert!(cache.is_unread(&id));
    assert_eq!(cache.view.group(&g).unowned, 1);
    // A read that saw a newer claim takes it away; the watch counts it.
    let newer = read_at(&ns, &id, Some(2), Some(9), 9);
    assert_eq!(cache.apply_read_back(&id, &newer), Some(vec![]));
    assert!(!cache.entries.contains_key(&id));
    assert_eq!(cache.view.group(&g).total(), 0);
    // A read-back for a task no longer cached changes nothing.
    let unowned = read_at(&ns, &id, Some(2), None, 9);
    assert_eq!(cache.apply_read_back(&id, &unowned), None);
    assert!(cache.entries.is_empty());
}

#[test]
fn a_read_back_older_than_a_resubmission_or_a_listing_is_not_applied() {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let g = GroupName::default();
    let id = TaskId::new("a").unwrap();
    // The task is claimed elsewhere at 5, deleted at 8 and submitted again
    // at 9, all seen by the watch before a read-back taken at 6 arrives: it
    // shows the first incarnation's owner, or no task at all.
    cache.apply_put(&kv(&ns.task(&id), task_value("default"), 9, 9));
    for stale in [
        read_at(&ns, &id, Some(2), Some(5), 6),
        read_at(&ns, &id, None, None, 6),
    ] {
        assert_eq!(cache.apply_read_back(&id, &stale), None);
        assert_eq!(cache.claim_basis(&id).map(|b| b.task_revision), Some(9));
        assert_eq!(cache.view.group(&g).unowned, 1);
    }
    // A listing through revision 20 holds the task unowned; a read-back
    // taken before it (another node's claim, released since) is older.
    let listing = [kv(&ns.task(&id), task_value("default"), 9, 9)];
    let (mut cache, _) = cache.rebuild(&listing, 20);
    assert_eq!(
        cache.apply_read_back(&id, &read_at(&ns, &id, Some(9), Some(12), 15)),
        None
    );
    assert_eq!(cache.view.group(&g).unowned, 1);
    // One taken after it applies.
    let later = read_at(&ns, &id, Some(9), Some(21), 22);
    assert_eq!(cache.apply_read_back(&id, &later), Some(vec![]));
    assert_eq!(cache.view.group(&g).unowned, 0);
}

#[test]
fn a_read_back_keeps_a_newer_run_record() {
    let (ns, mut cache, id) = cache_with_task_a();
    let run = |claims| {
        encode(&RunRecord {
            claims,
            ..RunRecord::default()
        })
    };
    cache.apply_put(&kv(&ns.run(&id), run(3), 2, 12));
    // Read at 10: an older run record, then none at all.
    let mut keys = read_at(&ns, &id, Some(2), None, 10);
    keys.run = Some(kv(&ns.run(&id), run(2), 2, 8));
    assert!(cache.apply_read_back(&id, &keys).is_some());
    keys.run = None;
    assert!(cache.apply_read_back(&id, &keys).is_some());
    let basis = cache.claim_basis(&id).unwrap();
    assert_eq!((basis.run_revision, basis.run.claims), (12, 3));
}

#[test]
fn an_owner_record_gone_unseen_asks_for_a_listing_and_a_rewritten_one_counts_once() {
    let (ns, mut cache, id) = cache_with_task_a();
    let g = GroupName::default();
    let other = NodeName::new("other").unwrap();
    let mut owner_kv = read_at(&ns, &id, None, Some(5), 5).owner.unwrap();
    cache.apply_put(&owner_kv);
    // Rewritten (nothing does; garbage or a hand-made write): one count.
    owner_kv.version = 2;
    owner_kv.mod_revision = 6;
    cache.apply_put(&owner_kv);
    assert_eq!(cache.view.group(&g).owned_by(&other), 1);
    // Its delete without the record it removed, or with garbage.
    let garbage = KeyValue {
        value: b"not json".to_vec(),
        ..owner_kv.clone()
    };
    for previous in [None, Some(&garbage)] {
        assert_eq!(
            cache.apply_delete(&ns.owner(&id), 7, previous),
            Change::OwnerGoneUnseen(id.clone())
        );
    }
    // Not so when the task went first in the same revision (its end), nor
    // for what a read-back found absent.
    cache.apply_delete(&ns.task(&id), 8, None);
    assert!(matches!(
        cache.apply_delete(&ns.owner(&id), 8, None),
        Change::OwnerChanged { freed: None, .. }
    ));
    assert!(matches!(
        cache.apply_delete(&ns.owner(&id), 0, None),
        Change::OwnerChanged { freed: None, .. }
    ));
}

#[tokio::test]
async fn held_back_tasks_are_no_candidates_but_still_count_as_unowned() {
    // Stands for the node's queue of ignore deadlines.
    let mut deadlines = tokio_util::time::DelayQueue::new();
    let mut deadline = || deadlines.insert((), std::time::Duration::from_secs(60));
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let g = GroupName::default();
    let id = |name: &str| TaskId::new(name).unwrap();
    let put = |cache: &mut Cache, name: &str, rev: Revision| {
        cache.apply_put(&kv(&ns.task(&id(name)), task_value("default"), rev, rev));
    };
    put(&mut cache, "a", 2);
    put(&mut cache, "b", 3);
    cache.hold_back(&id("a"), deadline());
    // Held before its task is known: held once it appears.
    cache.hold_back(&id("c"), deadline());
    put(&mut cache, "c", 4);
    let candidates = |cache: &Cache| cache.unowned(&g).map(|t| t.to_string()).collect::<Vec<_>>();
    assert_eq!(candidates(&cache), ["b"]);
    assert_eq!(cache.view.group(&g).unowned, 3);
    assert_eq!(cache.held_back(), 2);
    // A resync keeps them held.
    let kvs: Vec<KeyValue> = [("a", 2), ("b", 3), ("c", 4)]
        .iter()
        .map(|(name, rev)| kv(&ns.task(&id(name)), task_value("default"), *rev, *rev))
        .collect();
    let (mut cache, _) = cache.rebuild(&kvs, 0);
    assert_eq!(candidates(&cache), ["b"]);
    assert_eq!(cache.view.group(&g).unowned, 3);
    // An owner takes a held task out of the unowned count, and its
    // loss puts it back, still held.
    cache.set_mine(&id("c"), &g, 0);
    assert_eq!((cache.view.group(&g).unowned, cache.held_back()), (2, 1));
    cache.clear_tentative(&id("c"));
    assert_eq!((cache.view.group(&g).unowned, cache.held_back()), (3, 2));
    cache.end_hold(&id("a"));
    assert_eq!(candidates(&cache), ["a", "b"]);
    // A held task that is deleted leaves both the index and the count.
    cache.apply_delete(&ns.task(&id("c")), 9, None);
    assert_eq!((cache.view.group(&g).unowned, cache.held_back()), (2, 0));
    cache.end_hold(&id("c"));
    assert_eq!(candidates(&cache), ["a", "b"]);
    assert_eq!(cache.view.group(&g).unowned, 2);
}

#[test]
fn other_groups_are_counted_per_node_and_not_kept_per_task() {
    let ns = Namespace::new("t").unwrap();
    let me = NodeName::new("me").unwrap();
    let other = NodeName::new("other").unwrap();
    let mut cache = Cache::new(ns.clone(), me.clone(), &[GroupName::default()]);
    let elsewhere = GroupName::new("elsewhere").unwrap();
    let run = encode(&RunRecord {
        claims: 1,
        ..RunRecord::default()
    });
    let owner = encode(&OwnerRecord {
        node: other.clone(),
        group: elsewhere.clone(),
    });
    let ids: Vec<TaskId> = (0..50)
        .map(|i| TaskId::new(format!("e{i}")).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let rev = 10 * i as Revision + 2;
        let changes = [
            cache.apply_put(&kv(&ns.task(id), task_value("elsewhere"), rev, rev)),
            cache.apply_put(&kv(&ns.owner(id), owner.clone(), rev + 1, rev + 1)),
            cache.apply_put(&kv(&ns.run(id), run.clone(), rev, rev + 1)),
        ];
        assert!(changes.iter().all(|c| *c == Change::None), "{changes:?}");
    }
    // Nothing per task; the owner's count, for `--max-running`.
    assert!(cache.entries.is_empty());
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 50);
    assert_eq!(cache.view.group(&elsewhere).unowned, 0);
    // A delete says whose count drops through the record it removed.
    let owner_kv = kv(&ns.owner(&ids[0]), owner.clone(), 3, 3);
    let change = cache.apply_delete(&ns.owner(&ids[0]), 600, Some(&owner_kv));
    assert!(
        matches!(&change, Change::OwnerChanged { freed: Some(g), .. } if *g == elsewhere),
        "{change:?}"
    );
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 49);
    // Without it, nothing is known to drop.
    cache.apply_delete(&ns.owner(&ids[1]), 601, None);
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 49);
    // An owner record a lost claim read back is the watch's to count: it
    // brings the same put, and the count goes up once.
    let moved = TaskId::new("moved").unwrap();
    let read_back = [
        kv(&ns.task(&moved), task_value("elsewhere"), 590, 590),
        kv(&ns.owner(&moved), owner.clone(), 591, 591),
    ];
    let keys = TaskKeys {
        task: Some(read_back[0].clone()),
        owner: Some(read_back[1].clone()),
        run: None,
        revision: 592,
    };
    assert_eq!(cache.apply_read_back(&moved, &keys), None);
    assert!(cache.entries.is_empty());
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 49);
    cache.apply_put(&read_back[1]);
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 50);
    cache.apply_delete(&ns.owner(&moved), 603, Some(&read_back[1]));
    assert_eq!(cache.view.group(&elsewhere).owned_by(&other), 49);
    cache.apply_delete(&ns.task(&ids[2]), 602, None);
    assert!(cache.entries.is_empty());

    // A listing: tasks, then owners, then runs. A run record of a task
    // listed elsewhere is skipped; one whose task the listing missed
    // (submitted after tasks were read) is kept until that task shows
    // up, in a group served or not.
    let (late_mine, late_other) = (
        TaskId::new("late-1").unwrap(),
        TaskId::new("late-2").unwrap(),
    );
    let listing = [
        kv(&ns.task(&ids[3]), task_value("elsewhere"), 32, 32),
        kv(&ns.owner(&ids[3]), owner.clone(), 33, 33),
        kv(&ns.run(&ids[3]), run.clone(), 32, 33),
        kv(&ns.run(&late_mine), run.clone(), 700, 700),
        kv(&ns.run(&late_other), run.clone(), 701, 701),
    ];
    let (mut fresh, _) = cache.rebuild(&listing, 0);
    assert_eq!(fresh.view.group(&elsewhere).owned_by(&other), 1);
    assert_eq!(
        fresh.entries.len(),
        2,
        "the two runs the listing could not place"
    );
    assert!(fresh.skipped_in_listing.is_empty());
    fresh.apply_put(&kv(&ns.task(&late_mine), task_value("default"), 699, 699));
    let basis = fresh.claim_basis(&late_mine).expect("claimable");
    assert_eq!((basis.run_revision, basis.run.claims), (700, 1));
    fresh.apply_put(&kv(
        &ns.task(&late_other),
        task_value("elsewhere"),
        698,
        698,
    ));
    assert_eq!(fresh.entries.len(), 1);
}

#[test]
fn a_resync_keeps_unchanged_tasks_and_decodes_changed_ones() {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns.clone(), NodeName::new("me").unwrap(), &served());
    let (a, b) = (TaskId::new("a").unwrap(), TaskId::new("b").unwrap());
    let listing = [
        kv(&ns.task(&a), task_value("default"), 2, 2),
        kv(&ns.task(&b), task_value("default"), 3, 3),
    ];
    for kv in &listing {
        cache.apply_put(kv);
    }
    // `b` was replaced since (a new revision, another group).
    let relisted = [
        listing[0].clone(),
        kv(&ns.task(&b), task_value("other"), 3, 7),
    ];
    let (fresh, _) = cache.rebuild(&relisted, 0);
    assert_eq!(fresh.task(&a).unwrap().revision, 2);
    let b_now = fresh.task(&b).unwrap();
    assert_eq!(b_now.revision, 7);
    assert_eq!(b_now.group.as_str(), "other");
    assert_eq!(fresh.unowned(&GroupName::default()).count(), 1);
}

#[test]
fn a_task_entry_is_forgotten_once_all_its_keys_are_gone() {
    let ns = Namespace::new("t").unwrap();
    let me = NodeName::new("me").unwrap();
    let mut cache = Cache::new(ns.clone(), me.clone(), &served());
    let id = TaskId::new("a").unwrap();
    let run = encode(&RunRecord {
        claims: 1,
        takeovers: 0,
        open: true,
        node: Some(me.clone()),
    });
    let owner = encode(&OwnerRecord {
        node: me.clone(),
        group: GroupName::default(),
    });
    cache.apply_put(&kv(&ns.task(&id), task_value("default"), 2, 2));
    cache.apply_put(&kv(&ns.owner(&id), owner, 3, 3));
    cache.apply_put(&kv(&ns.run(&id), run, 3, 3));
    let basis_when_owned = cache.claim_basis(&id);
    assert!(basis_when_owned.is_none(), "an owned task is not claimable");
    cache.apply_delete(&ns.owner(&id), 4, None);
    assert!(
        cache.is_unread(&id) && cache.claim_basis(&id).is_none(),
        "unowned, and read before a claim: its run record changed unseen"
    );
    // Completion deletes its task, owner and run records in one
    // transaction; the watch brings the first two (run records are not
    // watched), and the entry must go with them, or a long-lived node would
    // leak one per task.
    cache.apply_delete(&ns.task(&id), 5, None);
    assert!(cache.entries.is_empty());
    assert_eq!(cache.view.group(&GroupName::default()).total(), 0);
    // A listed run record goes with its task too.
    cache.apply_put(&kv(&ns.task(&id), task_value("default"), 6, 6));
    cache.apply_put(&kv(&ns.run(&id), encode(&RunRecord::default()), 7, 7));
    cache.apply_delete(&ns.task(&id), 8, None);
    assert!(cache.entries.is_empty());
}

#[test]
fn a_claim_starts_from_the_run_records_counts() {
    let (ns, mut cache, id) = cache_with_task_a();
    let fresh = cache.claim_basis(&id).expect("claimable");
    assert_eq!((fresh.run_revision, fresh.run), (0, RunRecord::default()));
    for (open, revision) in [(true, 9), (false, 11)] {
        let record = RunRecord {
            claims: 7,
            takeovers: 5,
            open,
            node: Some(NodeName::new("gone").unwrap()),
        };
        cache.apply_put(&kv(&ns.run(&id), encode(&record), 3, revision));
        let basis = cache.claim_basis(&id).expect("claimable");
        // The counts and the revision the claim compares, not the claimant.
        assert_eq!(basis.run_revision, revision);
        assert_eq!(
            basis.run,
            RunRecord {
                node: None,
                ..record
            }
        );
    }
}

#[test]
fn garbage_is_reported_not_fatal() {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns, NodeName::new("me").unwrap(), &served());
    for (key, value) in [
        ("t/tasks/x", b"{not json".to_vec()),
        ("t/tasks/bad id", task_value("default")),
        ("t/owners/x", b"[]".to_vec()),
        ("t/nodes/n", b"{}".to_vec()),
        ("t/unknown/x", b"1".to_vec()),
        ("t/results/x", b"done!".to_vec()),
        ("t/states/x", b"{\"state\": \"dancing\"}".to_vec()),
        (
            "t/task-commands/x/1",
            b"{\"command\": \"explode\"}".to_vec(),
        ),
        ("t/checkpoints/x", vec![b'x'; MAX_CHECKPOINT_BYTES + 1]),
    ] {
        let change = cache.apply_put(&kv(key, value, 5, 5));
        assert!(matches!(change, Change::Malformed(_)), "{key}: {change:?}");
    }
    assert_eq!(cache.view.group(&GroupName::default()).total(), 0);
}

#[test]
fn a_node_record_without_a_lease_is_no_live_node() {
    // `etcdctl put NS/nodes/ghost '{...}'`: a valid record that nothing
    // will ever delete. It must not count in anyone's fair share.
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns, NodeName::new("me").unwrap(), &served());
    let record = encode(&NodeRecord {
        groups: vec![GroupName::default()],
        started_at_ms: 1,
        max_running: None,
        slots: Default::default(),
    });
    let change = cache.apply_put(&kv("t/nodes/ghost", record.clone(), 5, 5));
    match change {
        Change::Malformed(why) => assert!(why.contains("not attached to a lease"), "{why}"),
        other => panic!("a ghost node was taken for live: {other:?}"),
    }
    assert!(cache.node_names().is_empty());
    let mut leased = kv("t/nodes/real", record, 6, 6);
    leased.lease = 42;
    let change = cache.apply_put(&leased);
    assert!(
        matches!(change, Change::Membership { joined: true, .. }),
        "{change:?}"
    );
    assert_eq!(cache.node_names().len(), 1);
}

#[test]
fn a_task_record_over_the_spec_limit_is_malformed_and_unclaimable() {
    let ns = Namespace::new("t").unwrap();
    let mut cache = Cache::new(ns, NodeName::new("me").unwrap(), &served());
    let huge = serde_json::json!({
        "spec": { "group": "default", "properties": "x".repeat(eretes_protocol::MAX_SPEC_BYTES) },
        "submitted_at_ms": 1,
    });
    let change = cache.apply_put(&kv(
        "t/tasks/huge",
        serde_json::to_vec(&huge).unwrap(),
        5,
        5,
    ));
    match change {
        Change::Malformed(why) => assert!(why.contains("the limit is 65536 bytes"), "{why}"),
        other => panic!("a huge task record was accepted: {other:?}"),
    }
    assert_eq!(cache.unowned(&GroupName::default()).count(), 0);
    // The same record at a legal size is accepted.
    let change = cache.apply_put(&kv("t/tasks/huge", task_value("default"), 6, 5));
    assert!(!matches!(change, Change::Malformed(_)), "{change:?}");
    assert_eq!(cache.unowned(&GroupName::default()).count(), 1);
}
