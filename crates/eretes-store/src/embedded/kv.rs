//! The live map's reads and writes, as one revision applies them: ranged
//! gets (with etcd's `count` and `more`), puts and deletes that record the
//! events the history and the watchers get, and a transaction's compares.

use super::*;

impl State {
    pub(super) fn get(&self, request: &GetRequest, revision: Revision) -> GetResponse {
        if request.count_only {
            return GetResponse {
                kvs: Vec::new(),
                count: self.scan(&request.range).count(),
                more: false,
                revision,
            };
        }
        // As etcd, a limit of 0 means no limit.
        let limit = request.limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let mut keys = self.scan(&request.range);
        let kvs: Vec<KeyValue> = keys
            .by_ref()
            .take(limit)
            .map(|(key, entry)| key_value(key, entry))
            .collect();
        let rest = keys.count();
        GetResponse {
            count: kvs.len() + rest,
            kvs,
            more: rest > 0,
            revision,
        }
    }

    /// Apply a put at `revision`. The lease (if any) must exist.
    pub(super) fn put(
        &mut self,
        request: PutRequest,
        revision: Revision,
        events: &mut Vec<StoredEvent>,
    ) -> PutResponse {
        let PutRequest {
            key,
            value,
            lease,
            prev_kv: want_prev,
        } = request;
        // Exactly the value's size: it is kept for as long as the key lives.
        let value: Arc<[u8]> = value.into();
        // One tree search for a key that exists (the common case of a write
        // to a known task), two for a new one.
        let only_key = (Bound::Included(key.as_str()), Bound::Included(key.as_str()));
        let (key, previous, current) = match self.kvs.range_mut::<str, _>(only_key).next() {
            Some((known, slot)) => {
                let current = Entry {
                    value,
                    create_revision: slot.create_revision,
                    mod_revision: revision,
                    version: slot.version + 1,
                    lease,
                };
                let previous = std::mem::replace(slot, current.clone());
                (known.clone(), Some(previous), current)
            }
            None => {
                let key = ArcStr::from(key);
                let current = Entry {
                    value,
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                    lease,
                };
                self.kvs.insert(key.clone(), current.clone());
                (key, None, current)
            }
        };
        let old_lease = previous.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            if let Some(old) = self.leases.get_mut(&old_lease) {
                old.keys.remove(key.as_str());
            }
            if let Some(new) = self.leases.get_mut(&lease) {
                new.keys.insert(key.clone());
            }
        }
        let response = PutResponse {
            revision,
            prev_kv: previous
                .as_ref()
                .filter(|_| want_prev)
                .map(|p| key_value(&key, p)),
        };
        events.push(StoredEvent {
            key,
            current: Some(current),
            previous,
        });
        response
    }

    /// Apply a delete at `revision`; `events` holds the branch's earlier writes.
    pub(super) fn delete(
        &mut self,
        range: &KeyRange,
        want_prev: bool,
        revision: Revision,
        events: &mut Vec<StoredEvent>,
    ) -> DeleteResponse {
        let removed: Vec<(ArcStr, Entry)> = match range {
            KeyRange::Key(key) => self.kvs.remove_entry(key.as_str()).into_iter().collect(),
            KeyRange::Prefix(_) | KeyRange::Span { .. } => {
                let keys: Vec<ArcStr> = self.scan(range).map(|(key, _)| key.clone()).collect();
                keys.into_iter()
                    .filter_map(|key| self.kvs.remove(&key).map(|entry| (key, entry)))
                    .collect()
            }
        };
        let deleted = removed.len() as i64;
        let mut prev_kvs = Vec::new();
        for (key, entry) in removed {
            if entry.lease != 0 {
                if let Some(lease) = self.leases.get_mut(&entry.lease) {
                    lease.keys.remove(&key);
                }
            }
            if want_prev {
                prev_kvs.push(key_value(&key, &entry));
            }
            events.push(StoredEvent {
                key,
                current: None,
                previous: Some(entry),
            });
        }
        DeleteResponse {
            revision: if events.is_empty() {
                self.revision
            } else {
                revision
            },
            deleted,
            prev_kvs,
        }
    }

    pub(super) fn compare(&self, compare: &Compare) -> bool {
        let entry = self.kvs.get(compare.key.as_str());
        let ordering = match (&compare.target, entry) {
            // etcd: a value compare on a missing key always fails.
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(value), Some(entry)) => entry.value[..].cmp(value.as_slice()),
            (CompareTarget::Version(v), _) => entry.map_or(0, |e| e.version).cmp(v),
            (CompareTarget::CreateRevision(r), _) => entry.map_or(0, |e| e.create_revision).cmp(r),
            (CompareTarget::ModRevision(r), _) => entry.map_or(0, |e| e.mod_revision).cmp(r),
            (CompareTarget::Lease(l), _) => entry.map_or(0, |e| e.lease).cmp(l),
        };
        compare.op.holds(ordering)
    }

    pub(super) fn check_lease(&self, lease: LeaseId) -> StoreResult<()> {
        if lease == 0 || self.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }
}
