//! The window and the spilled backlog: a cache that spills must count,
//! find and hand out the same unowned tasks as one that keeps them all.

use proptest::prelude::*;

use super::tests::{kv, served, task_value};
use super::*;
use eretes_protocol::{encode, TaskKeys};

fn ns() -> Namespace {
    Namespace::new("t").unwrap()
}

fn me() -> NodeName {
    NodeName::new("me").unwrap()
}

fn other() -> NodeName {
    NodeName::new("other").unwrap()
}

fn id(n: i64) -> TaskId {
    TaskId::new(format!("t-{n:03}")).unwrap()
}

/// Task `n` submitted at revision `n` (and rewritten at `modr`).
fn task_kv(n: i64, modr: Revision) -> KeyValue {
    kv(&ns().task(&id(n)), task_value("default"), n, modr)
}

fn owner_kv(n: i64, node: &NodeName, revision: Revision) -> KeyValue {
    let record = OwnerRecord {
        node: node.clone(),
        group: GroupName::default(),
    };
    kv(&ns().owner(&id(n)), encode(&record), revision, revision)
}

fn candidates(cache: &Cache) -> Vec<String> {
    cache
        .unowned(&GroupName::default())
        .map(|id| id.to_string())
        .collect()
}

#[test]
fn a_backlog_beyond_the_window_is_spilled_and_comes_back_oldest_first() {
    let g = GroupName::default();
    let mut cache = Cache::new(ns(), me(), &served()).with_window(4);
    for n in 1..=10 {
        assert_eq!(
            cache.apply_put(&task_kv(n, n)),
            Change::TaskAdded(g.clone())
        );
    }
    assert_eq!(cache.view.group(&g).unowned, 10);
    assert_eq!(cache.spilled_count(), 6);
    assert_eq!(candidates(&cache), ["t-001", "t-002", "t-003", "t-004"]);
    assert!(cache.is_spilled(&id(5)) && cache.task(&id(5)).is_none());
    // This node claims the three oldest: for each, the window takes the
    // next oldest back.
    for n in 1..=3 {
        cache.set_mine(&id(n), &g, 0);
    }
    assert_eq!(
        candidates(&cache),
        ["t-004", "t-005", "t-006", "t-007"],
        "refilled in submission order"
    );
    let basis = cache.claim_basis(&id(5)).expect("claimable as spilled");
    assert_eq!(basis.task_revision, 5);
    // A window task put again (rewritten, or read back) takes no spilled
    // task back with it.
    cache.apply_put(&task_kv(4, 11));
    assert_eq!(cache.unowned(&g).count(), 4);
    assert_eq!(cache.view.group(&g).unowned, 7);
    assert_eq!(cache.view.group(&g).owned_by(&me()), 3);
    assert_eq!(cache.spilled_count(), 3);
}

#[test]
fn the_watch_finds_spilled_tasks() {
    let g = GroupName::default();
    let mut cache = Cache::new(ns(), me(), &served()).with_window(2);
    for n in 1..=6 {
        cache.apply_put(&task_kv(n, n));
    }
    assert_eq!(cache.spilled_count(), 4);
    // Another node claims a spilled task: counted as its, no longer unowned.
    assert_eq!(
        cache.apply_put(&owner_kv(3, &other(), 7)),
        Change::None,
        "nothing this node must act on"
    );
    assert!(!cache.is_spilled(&id(3)));
    assert_eq!(cache.view.group(&g).unowned, 5);
    assert_eq!(cache.view.group(&g).owned_by(&other()), 1);
    // A spilled task is deleted.
    cache.apply_delete(&ns().task(&id(4)), 8, None);
    assert_eq!(cache.view.group(&g).unowned, 4);
    // A spilled task's record is rewritten: it stays spilled, and comes back
    // to be read before its claim.
    assert_eq!(cache.apply_put(&task_kv(5, 9)), Change::None);
    assert!(cache.is_spilled(&id(5)));
    assert_eq!(cache.view.group(&g).unowned, 4);
    cache.set_mine(&id(1), &g, 0);
    cache.set_mine(&id(2), &g, 0);
    assert_eq!(candidates(&cache), ["t-005", "t-006"]);
    assert!(cache.is_unread(&id(5)) && cache.claim_basis(&id(5)).is_none());
    let keys = TaskKeys {
        task: Some(task_kv(5, 9)),
        owner: None,
        run: None,
        revision: 10,
    };
    assert!(cache.apply_read_back(&id(5), &keys).is_some());
    assert_eq!(cache.claim_basis(&id(5)).expect("read").task_revision, 9);
    // This node's own owner record of a spilled task (a claim the window
    // did not offer: a balancer's pick) takes it back as this node's.
    cache.apply_put(&task_kv(7, 7));
    cache.apply_put(&task_kv(8, 8));
    assert!(cache.is_spilled(&id(8)));
    cache.apply_put(&owner_kv(8, &me(), 11));
    assert!(!cache.is_spilled(&id(8)));
    assert_eq!(cache.owner(&id(8)).map(|owner| owner.epoch), Some(11));
    assert_eq!(cache.view.group(&g).owned_by(&me()), 3);
    assert_eq!(cache.view.group(&g).unowned, 3);
}

#[test]
fn a_listing_spills_the_newest_of_what_a_claim_could_take() {
    let g = GroupName::default();
    let cache = Cache::new(ns(), me(), &served()).with_window(3);
    let mut listing: Vec<KeyValue> = (1..=8).map(|n| task_kv(n, n)).collect();
    // Task 6 was claimed before (a run record); task 7 is rewritten.
    listing[6] = task_kv(7, 12);
    listing.push(kv(&ns().run(&id(6)), encode(&RunRecord::default()), 10, 10));
    let (cache, _) = cache.rebuild(&listing, 12);
    assert_eq!(cache.view.group(&g).unowned, 8);
    assert_eq!(
        candidates(&cache),
        ["t-001", "t-002", "t-003", "t-006", "t-007"],
        "the three oldest, and what a claim needs more of than a submission"
    );
    assert_eq!(cache.spilled_count(), 3);
    assert!(cache.is_spilled(&id(4)) && cache.is_spilled(&id(8)));
    // A task submitted later goes behind them.
    let mut cache = cache;
    cache.apply_put(&task_kv(13, 13));
    assert!(cache.is_spilled(&id(13)));
}

#[test]
fn a_batch_spills_and_held_tasks_leave_the_window_its_candidates() {
    let g = GroupName::default();
    let mut cache = Cache::new(ns(), me(), &served()).with_window(2);
    // Six tasks submitted in one transaction share a revision.
    for n in 1..=6 {
        cache.apply_put(&kv(&ns().task(&id(n)), task_value("default"), 7, 7));
    }
    assert_eq!(
        (cache.spilled_count(), cache.view.group(&g).unowned),
        (4, 6)
    );
    // The node holds back both candidates: two more come back to be
    // candidates, and so after a listing.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _context = runtime.enter();
    let mut deadlines = tokio_util::time::DelayQueue::new();
    for task in candidates(&cache) {
        let task = TaskId::new(task).unwrap();
        cache.hold_back(
            &task,
            deadlines.insert((), std::time::Duration::from_secs(60)),
        );
    }
    assert_eq!(cache.unowned(&g).count(), 2);
    assert_eq!(cache.spilled_count(), 2);
    let listing: Vec<KeyValue> = (1..=6)
        .map(|n| kv(&ns().task(&id(n)), task_value("default"), 7, 7))
        .collect();
    let (cache, _) = cache.rebuild(&listing, 7);
    assert_eq!(cache.unowned(&g).count(), 2);
    assert_eq!(
        (cache.spilled_count(), cache.view.group(&g).unowned),
        (2, 6)
    );
}

/// What the watch and the node do to a cache, for the property below.
#[derive(Debug, Clone)]
enum Step {
    /// A new task is submitted.
    Submit,
    /// Tasks are submitted in one transaction (one revision).
    SubmitBatch(usize),
    /// The node holds the `n`th unowned task back (its ignore list).
    Hold(usize),
    /// The node's `n`th hold ends.
    EndHold(usize),
    /// Another node claims the `n`th unowned task (by id).
    OtherClaims(usize),
    /// The `n`th unowned task is deleted.
    Delete(usize),
    /// The `n`th unowned task's record is rewritten.
    Rewrite(usize),
    /// This node claims its oldest candidate, and its owner record comes.
    IClaim,
    /// This node's `n`th owned task is released.
    IRelease(usize),
    /// The node lists the namespace again.
    Relist,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Submit),
        2 => (2..6usize).prop_map(Step::SubmitBatch),
        1 => any::<usize>().prop_map(Step::Hold),
        1 => any::<usize>().prop_map(Step::EndHold),
        2 => any::<usize>().prop_map(Step::OtherClaims),
        1 => any::<usize>().prop_map(Step::Delete),
        1 => any::<usize>().prop_map(Step::Rewrite),
        3 => Just(Step::IClaim),
        1 => any::<usize>().prop_map(Step::IRelease),
        1 => Just(Step::Relist),
    ]
}

/// The store's keys, kept beside the two caches so that a relist lists
/// what the watch brought.
#[derive(Default)]
struct Store {
    revision: Revision,
    keys: std::collections::BTreeMap<String, KeyValue>,
}

impl Store {
    fn put(&mut self, key: String, value: Vec<u8>) -> KeyValue {
        self.revision += 1;
        let create = self
            .keys
            .get(&key)
            .map_or(self.revision, |kv| kv.create_revision);
        let put = kv(&key, value, create, self.revision);
        self.keys.insert(key, put.clone());
        put
    }

    /// Put new keys in one transaction.
    fn put_batch(&mut self, keys: Vec<String>, value: Vec<u8>) -> Vec<KeyValue> {
        self.revision += 1;
        keys.into_iter()
            .map(|key| {
                let put = kv(&key, value.clone(), self.revision, self.revision);
                self.keys.insert(key, put.clone());
                put
            })
            .collect()
    }

    fn delete(&mut self, key: &str) -> (Revision, Option<KeyValue>) {
        self.revision += 1;
        (self.revision, self.keys.remove(key))
    }
}

/// Read back every unread candidate of `cache` from `store`, as the node
/// would before claiming it, until none is left (a read can bring another
/// task into the window).
fn read_unread(cache: &mut Cache, store: &Store) {
    let g = GroupName::default();
    for _ in 0..8 {
        let unread: Vec<TaskId> = cache
            .unowned(&g)
            .filter(|id| cache.is_unread(id))
            .cloned()
            .collect();
        if unread.is_empty() {
            return;
        }
        for task in unread {
            let keys = TaskKeys {
                task: store.keys.get(&ns().task(&task)).cloned(),
                owner: store.keys.get(&ns().owner(&task)).cloned(),
                run: store.keys.get(&ns().run(&task)).cloned(),
                revision: store.revision,
            };
            cache.apply_read_back(&task, &keys);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn a_spilling_cache_counts_and_finds_what_a_whole_one_does(
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let g = GroupName::default();
        let mut spilling = Cache::new(ns(), me(), &served()).with_window(3);
        let mut whole = Cache::new(ns(), me(), &served()).with_window(usize::MAX);
        let mut store = Store::default();
        let mut next = 0i64;
        let mut mine: Vec<TaskId> = Vec::new();
        let mut held: Vec<TaskId> = Vec::new();
        // Stands for the node's queue of ignore deadlines.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let _context = runtime.enter();
        let mut deadlines = tokio_util::time::DelayQueue::new();
        for step in steps {
            let unowned = whole.all_unowned(&g);
            let nth = |n: usize| (!unowned.is_empty())
                .then(|| TaskId::new(unowned[n % unowned.len()].clone()).unwrap());
            let mut puts = Vec::new();
            let mut deletes = Vec::new();
            match step {
                Step::Submit => {
                    next += 1;
                    puts.push(store.put(ns().task(&id(next)), task_value("default")));
                }
                Step::SubmitBatch(count) => {
                    let keys = (0..count).map(|_| {
                        next += 1;
                        ns().task(&id(next))
                    }).collect();
                    puts.extend(store.put_batch(keys, task_value("default")));
                }
                Step::Hold(n) => if let Some(task) = nth(n) {
                    let key = deadlines.insert((), std::time::Duration::from_secs(60));
                    spilling.hold_back(&task, key);
                    whole.hold_back(&task, key);
                    held.push(task);
                },
                Step::EndHold(n) => if !held.is_empty() {
                    let task = held.remove(n % held.len());
                    spilling.end_hold(&task);
                    whole.end_hold(&task);
                },
                Step::OtherClaims(n) => if let Some(task) = nth(n) {
                    let record = OwnerRecord { node: other(), group: g.clone() };
                    puts.push(store.put(ns().owner(&task), encode(&record)));
                },
                Step::Delete(n) => if let Some(task) = nth(n) {
                    deletes.push((ns().task(&task), store.delete(&ns().task(&task))));
                },
                Step::Rewrite(n) => if let Some(task) = nth(n) {
                    puts.push(store.put(ns().task(&task), task_value("default")));
                },
                Step::IClaim => {
                    // Not always the same oldest candidate: a task freed
                    // again is a candidate at once, ahead of spilled tasks
                    // submitted before its claim (see `spill.rs`).
                    let first = spilling.unowned(&g).next().cloned();
                    prop_assert_eq!(first.is_some(), whole.has_candidates(&g),
                        "no claimable task hidden, none made up");
                    if let Some(task) = first {
                        prop_assert!(whole.is_candidate(&task, &g), "{task} is no candidate");
                        spilling.set_mine(&task, &g, 0);
                        whole.set_mine(&task, &g, 0);
                        let record = OwnerRecord { node: me(), group: g.clone() };
                        puts.push(store.put(ns().owner(&task), encode(&record)));
                        mine.push(task);
                    }
                }
                Step::IRelease(n) => if !mine.is_empty() {
                    let task = mine.remove(n % mine.len());
                    deletes.push((ns().owner(&task), store.delete(&ns().owner(&task))));
                    // A release rewrites the run record (outside the watch)
                    // in the same revision; read back before a claim.
                    store.keys.insert(ns().run(&task), kv(&ns().run(&task),
                        encode(&RunRecord::default()), store.revision, store.revision));
                },
                Step::Relist => {
                    let listing: Vec<KeyValue> = store.keys.values().cloned().collect();
                    spilling = spilling.rebuild(&listing, store.revision).0;
                    whole = whole.rebuild(&listing, store.revision).0;
                }
            }
            for put in &puts {
                spilling.apply_put(put);
                whole.apply_put(put);
            }
            for (key, (revision, previous)) in &deletes {
                spilling.apply_delete(key, *revision, previous.as_ref());
                whole.apply_delete(key, *revision, previous.as_ref());
            }
            // Unread tasks (released ones, rewritten ones back from the
            // backlog) are read back as the node would.
            read_unread(&mut spilling, &store);
            read_unread(&mut whole, &store);
            prop_assert_eq!(spilling.all_unowned(&g), whole.all_unowned(&g));
            prop_assert_eq!(spilling.has_candidates(&g), whole.has_candidates(&g),
                "a candidate whenever one that keeps everything has one");
            let (a, b) = (spilling.view.group(&g), whole.view.group(&g));
            prop_assert_eq!(a.unowned, b.unowned);
            prop_assert_eq!(a.unowned, whole.all_unowned(&g).len());
            prop_assert_eq!(a.owned_by(&me()), b.owned_by(&me()));
            prop_assert_eq!(a.owned_by(&other()), b.owned_by(&other()));
            for task in spilling.unowned(&g).cloned().collect::<Vec<_>>() {
                prop_assert_eq!(spilling.claim_basis(&task), whole.claim_basis(&task));
            }
        }
    }
}
