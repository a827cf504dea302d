//! The embedded store against a naive model: seeded random operations
//! (puts, deletes, transactions, leases, compactions, watches) on both, and
//! every answer and watch event must be the same. Paused tokio time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use eretes_store::embedded::EmbeddedStore;
use eretes_store::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{next_batch, put};

#[derive(Default)]
struct Model {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, BTreeSet<String>>,
    dead_leases: Vec<LeaseId>,
    log: Vec<WatchEvent>,
}

impl Model {
    fn commit(&mut self, events: Vec<WatchEvent>) -> Revision {
        if !events.is_empty() {
            self.revision += 1;
            self.log.extend(events);
        }
        self.revision
    }

    fn get(&self, request: &GetRequest, revision: Revision) -> GetResponse {
        let all: Vec<KeyValue> = self
            .kvs
            .values()
            .filter(|kv| request.range.contains(&kv.key))
            .cloned()
            .collect();
        let count = all.len();
        if request.count_only {
            return GetResponse {
                kvs: vec![],
                count,
                more: false,
                revision,
            };
        }
        let limit = request.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let kvs: Vec<KeyValue> = all.into_iter().take(limit).collect();
        GetResponse {
            more: kvs.len() < count,
            kvs,
            count,
            revision,
        }
    }

    fn put(
        &mut self,
        request: &PutRequest,
        revision: Revision,
        events: &mut Vec<WatchEvent>,
    ) -> PutResponse {
        let prev = self.kvs.get(&request.key).cloned();
        if let Some(prev) = &prev {
            if let Some(keys) = self.leases.get_mut(&prev.lease) {
                keys.remove(&request.key);
            }
        }
        if request.lease != 0 {
            self.leases
                .get_mut(&request.lease)
                .unwrap()
                .insert(request.key.clone());
        }
        let kv = KeyValue {
            key: request.key.clone(),
            value: request.value.clone(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: request.lease,
        };
        self.kvs.insert(kv.key.clone(), kv.clone());
        events.push(WatchEvent {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        PutResponse {
            revision,
            prev_kv: if request.prev_kv { prev } else { None },
        }
    }

    fn delete(
        &mut self,
        request: &DeleteRequest,
        revision: Revision,
        events: &mut Vec<WatchEvent>,
    ) -> DeleteResponse {
        let keys: Vec<String> = self
            .kvs
            .keys()
            .filter(|k| request.range.contains(k))
            .cloned()
            .collect();
        let mut prev_kvs = vec![];
        for key in &keys {
            let prev = self.kvs.remove(key).unwrap();
            if let Some(keys) = self.leases.get_mut(&prev.lease) {
                keys.remove(key);
            }
            events.push(tombstone(prev.clone(), revision));
            prev_kvs.push(prev);
        }
        DeleteResponse {
            revision: if events.is_empty() {
                self.revision
            } else {
                revision
            },
            deleted: keys.len() as i64,
            prev_kvs: if request.prev_kv { prev_kvs } else { vec![] },
        }
    }

    fn revoke(&mut self, lease: LeaseId) -> StoreResult<()> {
        let keys = self
            .leases
            .remove(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        self.dead_leases.push(lease);
        let revision = self.revision + 1;
        let events = keys
            .into_iter()
            .map(|k| tombstone(self.kvs.remove(&k).unwrap(), revision))
            .collect();
        self.commit(events);
        Ok(())
    }

    fn compare(&self, compare: &Compare) -> bool {
        let kv = self.kvs.get(&compare.key);
        let ordering = match &compare.target {
            CompareTarget::Value(v) => match kv {
                None => return false,
                Some(kv) => kv.value.cmp(v),
            },
            CompareTarget::Version(n) => kv.map_or(0, |kv| kv.version).cmp(n),
            CompareTarget::CreateRevision(n) => kv.map_or(0, |kv| kv.create_revision).cmp(n),
            CompareTarget::ModRevision(n) => kv.map_or(0, |kv| kv.mod_revision).cmp(n),
            CompareTarget::Lease(n) => kv.map_or(0, |kv| kv.lease).cmp(n),
        };
        compare.op.holds(ordering)
    }

    fn has_duplicates(ops: &[TxnOp]) -> bool {
        let puts: Vec<&str> = ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Put(p) => Some(p.key.as_str()),
                _ => None,
            })
            .collect();
        ops.iter().any(|op| match op {
            TxnOp::Put(p) => puts.iter().filter(|k| **k == p.key).count() > 1,
            TxnOp::Delete(d) => puts.iter().any(|k| d.range.contains(k)),
            TxnOp::Get(_) => false,
        })
    }

    fn txn(&mut self, txn: &Txn) -> StoreResult<TxnResponse> {
        if Self::has_duplicates(&txn.success) || Self::has_duplicates(&txn.failure) {
            return Err(StoreError::InvalidArgument(String::new()));
        }
        let succeeded = txn.compares.iter().all(|c| self.compare(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        for op in ops {
            if let TxnOp::Put(p) = op {
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(StoreError::LeaseNotFound(p.lease));
                }
            }
        }
        let revision = self.revision + 1;
        let mut events = vec![];
        let mut responses = vec![];
        for op in ops {
            responses.push(match op {
                TxnOp::Get(g) => {
                    let seen = if events.is_empty() {
                        self.revision
                    } else {
                        revision
                    };
                    TxnOpResponse::Get(self.get(g, seen))
                }
                TxnOp::Put(p) => TxnOpResponse::Put(self.put(p, revision, &mut events)),
                TxnOp::Delete(d) => TxnOpResponse::Delete(self.delete(d, revision, &mut events)),
            });
        }
        let revision = self.commit(events);
        Ok(TxnResponse {
            succeeded,
            revision,
            responses,
        })
    }
}

fn tombstone(prev: KeyValue, revision: Revision) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: prev.key.clone(),
            value: vec![],
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: 0,
        },
        prev_kv: Some(prev),
    }
}

const KEYS: &[&str] = &["m/a", "m/b", "m/ab", "m/a/x", "m/a/y", "n/a", "m"];
const PREFIXES: &[&str] = &["m/", "m/a", "m/a/", "n/", ""];
const VALUES: &[&str] = &["", "0", "1", "2"];

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn random_range(rng: &mut StdRng) -> KeyRange {
    if rng.gen_bool(0.6) {
        KeyRange::key(pick(rng, KEYS))
    } else {
        KeyRange::prefix(pick(rng, PREFIXES))
    }
}

fn random_lease(rng: &mut StdRng, model: &Model) -> LeaseId {
    let live: Vec<LeaseId> = model.leases.keys().copied().collect();
    match rng.gen_range(0..10) {
        0..=5 => 0,
        6..=8 if !live.is_empty() => pick(rng, &live),
        _ if !model.dead_leases.is_empty() => pick(rng, &model.dead_leases),
        _ => 0,
    }
}

fn random_put(rng: &mut StdRng, model: &Model) -> PutRequest {
    let mut request = put(pick(rng, KEYS), pick(rng, VALUES)).with_lease(random_lease(rng, model));
    request.prev_kv = rng.gen_bool(0.5);
    request
}

fn random_get(rng: &mut StdRng) -> GetRequest {
    let mut request = GetRequest::new(random_range(rng));
    request.limit = [None, Some(0), Some(1), Some(2)][rng.gen_range(0..4)];
    request.count_only = rng.gen_bool(0.2);
    request
}

fn random_delete(rng: &mut StdRng) -> DeleteRequest {
    let mut request = DeleteRequest::new(random_range(rng));
    request.prev_kv = rng.gen_bool(0.5);
    request
}

fn random_ops(rng: &mut StdRng, model: &Model) -> Vec<TxnOp> {
    (0..rng.gen_range(0..4))
        .map(|_| match rng.gen_range(0..3) {
            0 => TxnOp::Get(random_get(rng)),
            1 => TxnOp::Put(random_put(rng, model)),
            _ => TxnOp::Delete(random_delete(rng)),
        })
        .collect()
}

fn random_compare(rng: &mut StdRng, model: &Model) -> Compare {
    let op = pick(
        rng,
        &[
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ],
    );
    let number = rng.gen_range(-1..=model.revision + 1);
    let target = match rng.gen_range(0..5) {
        0 => CompareTarget::Value(pick(rng, VALUES).into()),
        1 => CompareTarget::Version(rng.gen_range(-1..4)),
        2 => CompareTarget::CreateRevision(number),
        3 => CompareTarget::ModRevision(number),
        _ => CompareTarget::Lease(random_lease(rng, model)),
    };
    Compare::new(pick(rng, KEYS), op, target)
}

/// Errors compare by variant (and lease); messages are free-form.
fn same_outcome<T: PartialEq + std::fmt::Debug>(
    store: &StoreResult<T>,
    model: &StoreResult<T>,
) -> bool {
    match (store, model) {
        (Ok(a), Ok(b)) => a == b,
        (Err(StoreError::InvalidArgument(_)), Err(StoreError::InvalidArgument(_))) => true,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

#[tokio::test(start_paused = true)]
async fn random_operations_match_a_naive_model() {
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let store = EmbeddedStore::new();
        let mut model = Model {
            revision: 1,
            ..Model::default()
        };
        let mut watch_all = store.watch(KeyRange::prefix(""), 0).await.unwrap();
        for step in 0..600 {
            let what = format!("seed {seed} step {step}");
            match rng.gen_range(0..20) {
                0..=4 => {
                    let request = random_put(&mut rng, &model);
                    let got = store.put(request.clone()).await;
                    let want = match request.lease {
                        l if l != 0 && !model.leases.contains_key(&l) => {
                            Err(StoreError::LeaseNotFound(l))
                        }
                        _ => {
                            let revision = model.revision + 1;
                            let mut events = vec![];
                            let response = model.put(&request, revision, &mut events);
                            model.commit(events);
                            Ok(response)
                        }
                    };
                    assert!(
                        same_outcome(&got, &want),
                        "{what}: {request:?}\n store {got:?}\n model {want:?}"
                    );
                }
                5..=6 => {
                    let request = random_delete(&mut rng);
                    let got = store.delete(request.clone()).await;
                    let mut events = vec![];
                    let want = model.delete(&request, model.revision + 1, &mut events);
                    model.commit(events);
                    assert_eq!(got, Ok(want), "{what}: {request:?}");
                }
                7..=8 => {
                    let request = random_get(&mut rng);
                    let got = store.get(request.clone()).await;
                    assert_eq!(
                        got,
                        Ok(model.get(&request, model.revision)),
                        "{what}: {request:?}"
                    );
                }
                9..=15 => {
                    let mut txn = Txn::new();
                    for _ in 0..rng.gen_range(0..3) {
                        txn = txn.when(random_compare(&mut rng, &model));
                    }
                    txn.success = random_ops(&mut rng, &model);
                    txn.failure = random_ops(&mut rng, &model);
                    let got = store.txn(txn.clone()).await;
                    let want = model.txn(&txn);
                    assert!(
                        same_outcome(&got, &want),
                        "{what}: {txn:?}\n store {got:?}\n model {want:?}"
                    );
                }
                16 => {
                    let grant = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
                    model.leases.insert(grant.id, BTreeSet::new());
                }
                17 => {
                    let lease = random_lease(&mut rng, &model);
                    if lease != 0 {
                        let got = store.lease_revoke(lease).await;
                        assert_eq!(got, model.revoke(lease), "{what}: revoke {lease}");
                    }
                }
                _ => {
                    let lease = random_lease(&mut rng, &model);
                    if lease != 0 {
                        let got = store.lease_keepalive(lease).await;
                        let want = match model.leases.contains_key(&lease) {
                            true => Ok(Duration::from_secs(3600)),
                            false => Err(StoreError::LeaseNotFound(lease)),
                        };
                        assert_eq!(got, want, "{what}: keepalive {lease}");
                    }
                }
            }
            assert_eq!(store.revision(), model.revision, "{what}: revision");
        }

        // The live watch saw exactly the model's log, in order.
        let mut seen = vec![];
        while seen.len() < model.log.len() {
            seen.extend(next_batch(&mut watch_all).await);
        }
        assert_eq!(seen, model.log, "seed {seed}: live watch");
        // Replays from any revision, of any range, match the log too.
        for _ in 0..10 {
            let start = rng.gen_range(1..=model.revision);
            let range = random_range(&mut rng);
            let want: Vec<WatchEvent> = model
                .log
                .iter()
                .filter(|e| e.kv.mod_revision >= start && range.contains(&e.kv.key))
                .cloned()
                .collect();
            let mut stream = store.watch(range.clone(), start).await.unwrap();
            let mut got = vec![];
            while got.len() < want.len() {
                got.extend(next_batch(&mut stream).await);
            }
            assert_eq!(got, want, "seed {seed}: replay of {range:?} from {start}");
        }
    }
}
