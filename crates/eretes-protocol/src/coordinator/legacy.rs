//! Run records where builds before the move to `claims/` kept them
//! (`runs/<id>`), moved to where they live now.
//!
//! The move took run records out of every node's watch (see
//! [`crate::keys`]). A cluster upgraded from a build before it still holds
//! its run records under `runs/`; a node moves them before each listing,
//! which costs one read of an empty prefix once they are all moved. During
//! a rolling upgrade, a node of an older build still writes `runs/<id>`:
//! where `claims/<id>` exists already, the newer record wins and the old
//! one goes, so such a task may count one claim or takeover more or fewer
//! than it had. Which node owns a task is decided by its owner record
//! alone, which no build moved.

use super::*;
use crate::keys::KeyKind;

impl Coordinator {
    /// Move every run record under `runs/` to `claims/`, in transactions of
    /// up to [`MAX_CLAIM_BATCH`] records, and return how many were moved.
    /// A record moves only if it is still as read and nothing is under its
    /// new key yet; otherwise it is deleted if still as read (the record
    /// under `claims/` is newer), or left for the next call (it changed).
    /// Keys under `runs/` that name no valid task id, and values that are
    /// no run record, are left alone: moved, garbage would become a run
    /// record that every claim of its task reads.
    pub async fn move_legacy_run_records(&self) -> Result<usize, ProtocolError> {
        let listed = self.store.get_prefix(&self.ns.legacy_runs_prefix()).await?;
        let legacy: Vec<(TaskId, KeyValue)> = listed
            .kvs
            .into_iter()
            .filter_map(|kv| match self.ns.parse(&kv.key) {
                Ok(KeyKind::LegacyRun(id))
                    if decode::<RunRecord>("run", &kv.key, &kv.value).is_ok() =>
                {
                    Some((id, kv))
                }
                _ => None,
            })
            .collect();
        let mut moved = 0;
        for chunk in legacy.chunks(MAX_CLAIM_BATCH) {
            let batch = chunk
                .iter()
                .fold(Txn::new(), |txn, (id, kv)| self.move_one(txn, id, kv));
            if self.store.txn(batch).await?.succeeded {
                moved += chunk.len();
                continue;
            }
            for (id, kv) in chunk {
                if self
                    .store
                    .txn(self.move_one(Txn::new(), id, kv))
                    .await?
                    .succeeded
                {
                    moved += 1;
                    continue;
                }
                let drop_old = Txn::new()
                    .when(Compare::mod_revision_is(kv.key.clone(), kv.mod_revision))
                    .and_then(delete(kv.key.clone()));
                self.store.txn(drop_old).await?;
            }
        }
        Ok(moved)
    }

    /// `txn` with the move of the legacy run record `kv` of `id`: checked
    /// as read and its new key empty; put there, deleted here.
    fn move_one(&self, txn: Txn, id: &TaskId, kv: &KeyValue) -> Txn {
        let new_key = self.ns.run(id);
        txn.when(Compare::mod_revision_is(kv.key.clone(), kv.mod_revision))
            .when(Compare::absent(new_key.clone()))
            .and_then(put(new_key, kv.value.clone()))
            .and_then(delete(kv.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eretes_store::embedded::EmbeddedStore;

    fn legacy_key(coordinator: &Coordinator, id: &str) -> String {
        format!("{}{id}", coordinator.namespace().legacy_runs_prefix())
    }

    #[tokio::test]
    async fn legacy_run_records_move_and_a_newer_one_wins() {
        let store = EmbeddedStore::new();
        let coordinator = Coordinator::new(store.clone(), Namespace::new("n").unwrap());
        let record = |claims: u32| {
            encode(&RunRecord {
                claims,
                takeovers: 1,
                open: true,
                node: None,
            })
        };
        // 40 legacy records: more than one transaction's worth.
        for n in 0..40 {
            store
                .put(PutRequest::new(
                    legacy_key(&coordinator, &format!("t{n}")),
                    record(n),
                ))
                .await
                .unwrap();
        }
        // t0 was claimed by a newer build already: its record wins.
        let t0 = TaskId::new("t0").unwrap();
        store
            .put(PutRequest::new(
                coordinator.namespace().run(&t0),
                record(99),
            ))
            .await
            .unwrap();
        // Garbage under runs/ is not a run record of any task: left alone,
        // whether its key names no task or its value is no run record.
        let garbage = format!("{}a/b", coordinator.namespace().legacy_runs_prefix());
        let not_a_record = legacy_key(&coordinator, "t40");
        for key in [&garbage, &not_a_record] {
            store
                .put(PutRequest::new(key.clone(), b"x".to_vec()))
                .await
                .unwrap();
        }

        assert_eq!(coordinator.move_legacy_run_records().await.unwrap(), 39);

        let left = store
            .get_prefix(&coordinator.namespace().legacy_runs_prefix())
            .await
            .unwrap();
        let left: Vec<&str> = left.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(left, vec![garbage.as_str(), not_a_record.as_str()]);
        let t40 = TaskId::new("t40").unwrap();
        assert!(store
            .get_key(&coordinator.namespace().run(&t40))
            .await
            .unwrap()
            .is_none());
        for n in 0..40 {
            let id = TaskId::new(format!("t{n}")).unwrap();
            let kv = store
                .get_key(&coordinator.namespace().run(&id))
                .await
                .unwrap()
                .expect("moved");
            let run: RunRecord = decode("run", &kv.key, &kv.value).unwrap();
            assert_eq!(run.claims, if n == 0 { 99 } else { n });
            assert!(run.open && run.takeovers == 1);
        }
        // Nothing left to move: one read of an empty prefix.
        assert_eq!(coordinator.move_legacy_run_records().await.unwrap(), 0);
    }
}
