//! What the embedded store does when its durable journal cannot write a
//! revision (a full disk, a file-size limit, an I/O error): a client's write
//! is undone and refused, a lease's deletions stand. Nothing else depends on
//! the journal, so reads, watches and leases go on meanwhile, and the
//! journal writes again by itself once it can (see `journal`).

use super::{Entry, State, StoredEvent};
use crate::types::Revision;

impl State {
    /// [`State::commit`] for the deletions of a lease's expiry or
    /// revocation, which stand even if the journal cannot write them.
    ///
    /// They cannot be undone: the lease is gone (an expired lease cannot be
    /// kept alive on a disk's account, nor a revoked one handed back to a
    /// caller who revoked it) and its keys must go with it. Durability does
    /// not suffer: every open of the file deletes the keys it holds under a
    /// lease, so a file that missed these deletions still opens without
    /// them, and the journal rewrites their rows at its next successful
    /// write (they are unsynced), after which the file is the store again.
    /// What a crash before that write loses is the numbering: the reopened
    /// store redoes the deletions as one revision after the file's last one,
    /// which may be lower than the revision these deletions reached here.
    pub(super) fn commit_lease_deletes(&mut self, revision: Revision, events: Vec<StoredEvent>) {
        if events.is_empty() {
            return;
        }
        // The journal logs and keeps the failure (`write_failure`).
        let _ = self.write_journal(revision, &events);
        self.publish(revision, events);
    }

    /// Write `revision` to the durable journal, if there is one. `kvs`
    /// already holds `events`.
    pub(super) fn write_journal(
        &mut self,
        revision: Revision,
        events: &[StoredEvent],
    ) -> Result<(), String> {
        debug_assert_eq!(revision, self.revision + 1);
        match &mut self.journal {
            Some(journal) => journal.record(revision, &[events], &self.kvs),
            None => Ok(()),
        }
    }

    /// Undo `events`, applied to `kvs` and the leases' key sets but not
    /// committed: each key gets its previous version back (last event
    /// first) and moves back to its previous lease.
    pub(super) fn roll_back(&mut self, events: Vec<StoredEvent>) {
        for event in events.into_iter().rev() {
            let lease_of = |entry: &Option<Entry>| entry.as_ref().map_or(0, |e| e.lease);
            let (now, before) = (lease_of(&event.current), lease_of(&event.previous));
            // As `put` and `delete` moved it; a key's lease is live while
            // the key is (nothing revoked one since: the lock is held).
            if now != before {
                if let Some(lease) = self.leases.get_mut(&now) {
                    lease.keys.remove(&event.key);
                }
                if let Some(lease) = self.leases.get_mut(&before) {
                    lease.keys.insert(event.key.clone());
                }
            }
            match event.previous {
                Some(previous) => self.kvs.insert(event.key, previous),
                None => self.kvs.remove(&event.key),
            };
        }
    }
}
