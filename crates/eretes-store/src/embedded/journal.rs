//! The embedded store's durable journal: its live keys and its revision, in
//! one redb file.
//!
//! Every committed revision is written in one redb write transaction (fsync'd
//! before it commits) *before* watchers see it or the caller gets its answer,
//! so whatever a client was told was written survives a crash or `kill -9`.
//! Only the live keys are kept, not the watch history: after a restart,
//! watches from an older revision fail as compacted, as on an etcd whose
//! history was compacted up to its current revision.
//!
//! A row is the key, and as value a 32-byte header (create revision, mod
//! revision, version, lease; little-endian `i64`s) followed by the value.
//!
//! # When a write fails
//!
//! A disk that is full (ENOSPC), a file-size limit (EFBIG) or an I/O error
//! fails one write; the store then rolls a client's write back, or keeps a
//! lease's deletions in memory only (see `write_failure.rs`). redb answers
//! every later call on that database with "previous I/O error", so the
//! journal drops it and opens the file again at the next write, at most once
//! per [`JOURNAL_REOPEN_INTERVAL`]; writes in between fail at once with the
//! last error. Opening repairs the file (redb walks it), back to its last
//! committed transaction.
//!
//! The keys of every write that failed are remembered as *unsynced*: their
//! rows may differ from the store's (a client's write that failed in its
//! final sync may have reached the disk all the same, and a lease's
//! deletions never did). The next write that succeeds rewrites those rows
//! as the store has them now, in the same transaction as its own events and
//! revision, so from then on the file is the store again. Should the process
//! die before that, the file holds what it held before the failure (or, if
//! the failed write reached the disk after all, that write too); a reopen
//! then deletes every key that was under a lease (as it always does), which
//! covers the lease deletions that never reached the file.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arcstr::ArcStr;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Entry, StoredEvent, JOURNAL_REOPEN_INTERVAL};
use crate::error::StoreError;
use crate::types::Revision;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const HEADER: usize = 32;

/// An open journal file. redb holds a lock on it, so a second store (in this
/// process or another) cannot open the same file.
pub(super) struct Journal {
    /// The database; `None` from a failed write until it is reopened.
    db: Option<Database>,
    path: PathBuf,
    /// The last failure, from the first write that failed until one
    /// succeeds again.
    failure: Option<String>,
    /// When the last write or reopen failed: the next reopen waits
    /// [`JOURNAL_REOPEN_INTERVAL`] from then.
    failed_at: Option<Instant>,
    /// Keys whose rows may differ from the store's, because a write of
    /// theirs failed; rewritten by the next write that succeeds.
    unsynced: HashSet<ArcStr>,
    /// Transactions committed (each one fsync).
    pub commits: u64,
}

/// What a journal held when it was opened.
pub(super) struct Loaded {
    /// The revision of the last committed write (1 for a new file).
    pub revision: Revision,
    /// Every live key.
    pub keys: Vec<(String, Entry)>,
}

/// redb's page cache for the journal. The store serves every read from
/// memory and reads the journal only when it opens it, so the cache serves
/// only the pages a write touches again soon (the tree's upper levels).
/// redb's default, 1 GiB, let it keep every page ever written: some 14 KiB
/// per task an agent ever ran, never given back.
const JOURNAL_CACHE: usize = 8 << 20;

impl Journal {
    /// Open (or create) the journal at `path` and read it whole.
    pub fn open(path: &Path) -> Result<(Journal, Loaded), StoreError> {
        let failed = |what: &str, error: String| {
            StoreError::Unavailable(format!(
                "the durable store {}: {what}: {error}",
                path.display()
            ))
        };
        let db = Database::builder()
            .set_cache_size(JOURNAL_CACHE)
            .create(path)
            .map_err(|e| failed("cannot open it", text(e)))?;
        let loaded = read(&db).map_err(|e| failed("cannot read it", e))?;
        let journal = Journal {
            db: Some(db),
            path: path.to_path_buf(),
            failure: None,
            failed_at: None,
            unsynced: HashSet::new(),
            commits: 0,
        };
        Ok((journal, loaded))
    }

    /// The last write's failure, if it failed (cleared when one succeeds).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Write up to revision `revision`: the `events` of each revision since
    /// the last one written, in order, and the unsynced keys as `kvs` (the
    /// store, with `events` applied) has them, in one transaction. An error
    /// names the file and says why; the events' keys are unsynced then.
    pub fn record(
        &mut self,
        revision: Revision,
        events: &[&[StoredEvent]],
        kvs: &BTreeMap<ArcStr, Entry>,
    ) -> Result<(), String> {
        match self.try_record(revision, events, kvs) {
            Ok(()) => {
                self.commits += 1;
                if self.failure.take().is_some() {
                    tracing::info!(file = %self.path.display(), "the durable store writes again");
                }
                self.unsynced.clear();
                Ok(())
            }
            Err(failure) => {
                if self.failure.is_none() {
                    tracing::error!(%failure, "writes fail until the durable store can write again; reads go on");
                }
                let keys = events.iter().flat_map(|events| events.iter());
                self.unsynced.extend(keys.map(|e| e.key.clone()));
                self.failure = Some(failure.clone());
                Err(failure)
            }
        }
    }

    /// If the journal has failed and may be reopened now, try to write
    /// (revision `revision`, the unsynced keys from `kvs`), so that a health
    /// check sees the journal recover without waiting for a client's write.
    pub fn retry(&mut self, revision: Revision, kvs: &BTreeMap<ArcStr, Entry>) {
        if self.failure.is_some() && self.reopen_due() {
            let _ = self.record(revision, &[], kvs);
        }
    }

    fn reopen_due(&self) -> bool {
        self.failed_at
            .is_none_or(|at| at.elapsed() >= JOURNAL_REOPEN_INTERVAL)
    }

    fn try_record(
        &mut self,
        revision: Revision,
        events: &[&[StoredEvent]],
        kvs: &BTreeMap<ArcStr, Entry>,
    ) -> Result<(), String> {
        let db = match &self.db {
            Some(db) => db,
            // Dropped by a failed write, whose error is kept until a write
            // succeeds: fail fast with it until the file may be reopened.
            None if !self.reopen_due() => {
                return Err(self
                    .failure
                    .clone()
                    .unwrap_or_else(|| self.failed("not open")))
            }
            None => match Database::open(&self.path) {
                Ok(db) => self.db.insert(db),
                Err(error) => {
                    self.failed_at = Some(Instant::now());
                    return Err(self.failed(&format!("reopening it: {}", text(error))));
                }
            },
        };
        if let Err(error) = write(db, revision, events, &self.unsynced, kvs) {
            // redb refuses every later call on a database that saw an I/O
            // error; only a new one (which repairs the file) writes again.
            self.db = None;
            self.failed_at = Some(Instant::now());
            return Err(self.failed(&error));
        }
        Ok(())
    }

    fn failed(&self, error: &str) -> String {
        format!(
            "the durable store {} cannot write: {error}",
            self.path.display()
        )
    }
}

fn read(db: &Database) -> Result<Loaded, String> {
    // Create the tables on first use, so that a read of a new file works.
    let txn = db.begin_write().map_err(text)?;
    txn.open_table(KEYS).map_err(text)?;
    txn.open_table(META).map_err(text)?;
    txn.commit().map_err(text)?;

    let txn = db.begin_read().map_err(text)?;
    let meta = txn.open_table(META).map_err(text)?;
    let revision = meta.get(REVISION).map_err(text)?.map_or(1, |v| v.value());
    let table = txn.open_table(KEYS).map_err(text)?;
    let mut keys = Vec::with_capacity(table.len().map_err(text)? as usize);
    for row in table.iter().map_err(text)? {
        let (key, row) = row.map_err(text)?;
        let key = key.value().to_string();
        let entry = decode(row.value())
            .ok_or_else(|| format!("the row of key {key:?} is shorter than its header"))?;
        keys.push((key, entry));
    }
    Ok(Loaded { revision, keys })
}

/// One transaction: the `unsynced` keys as `kvs` has them, then `events`,
/// then `revision`.
fn write(
    db: &Database,
    revision: Revision,
    events: &[&[StoredEvent]],
    unsynced: &HashSet<ArcStr>,
    kvs: &BTreeMap<ArcStr, Entry>,
) -> Result<(), String> {
    let txn = db.begin_write().map_err(text)?;
    {
        let mut keys = txn.open_table(KEYS).map_err(text)?;
        let mut row = Vec::new();
        let synced = unsynced.iter().map(|key| (key, kvs.get(key)));
        let applied = events
            .iter()
            .flat_map(|events| events.iter())
            .map(|e| (&e.key, e.current.as_ref()));
        for (key, entry) in synced.chain(applied) {
            match entry {
                Some(entry) => {
                    encode(entry, &mut row);
                    keys.insert(key.as_str(), row.as_slice()).map_err(text)?;
                }
                None => {
                    keys.remove(key.as_str()).map_err(text)?;
                }
            }
        }
        txn.open_table(META)
            .map_err(text)?
            .insert(REVISION, revision)
            .map_err(text)?;
    }
    txn.commit().map_err(text)?;
    Ok(())
}

/// A redb error as text (redb's error type is large, and only its message
/// reaches the caller).
fn text(error: impl Into<redb::Error>) -> String {
    error.into().to_string()
}

fn encode(entry: &Entry, row: &mut Vec<u8>) {
    row.clear();
    for field in [
        entry.create_revision,
        entry.mod_revision,
        entry.version,
        entry.lease,
    ] {
        row.extend_from_slice(&field.to_le_bytes());
    }
    row.extend_from_slice(&entry.value);
}

fn decode(row: &[u8]) -> Option<Entry> {
    if row.len() < HEADER {
        return None;
    }
    let field = |n: usize| i64::from_le_bytes(row[n * 8..n * 8 + 8].try_into().unwrap());
    Some(Entry {
        create_revision: field(0),
        mod_revision: field(1),
        version: field(2),
        lease: field(3),
        value: Arc::from(&row[HEADER..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_short_rows_are_refused() {
        let entry = Entry {
            value: Arc::from(&b"hello"[..]),
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 0x7f00_0000_0000_0001,
        };
        let mut row = Vec::new();
        encode(&entry, &mut row);
        assert_eq!(row.len(), HEADER + 5);
        let back = decode(&row).unwrap();
        assert_eq!(
            (
                back.create_revision,
                back.mod_revision,
                back.version,
                back.lease
            ),
            (3, 9, 4, 0x7f00_0000_0000_0001)
        );
        assert_eq!(&back.value[..], b"hello");
        assert!(decode(&row[..HEADER - 1]).is_none());
    }
}
