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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Entry, StoredEvent};
use crate::error::StoreError;
use crate::types::Revision;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const HEADER: usize = 32;

/// An open journal file. redb holds a lock on it, so a second store (in this
/// process or another) cannot open the same file.
pub(super) struct Journal {
    db: Database,
    path: PathBuf,
}

/// What a journal held when it was opened.
pub(super) struct Loaded {
    /// The revision of the last committed write (1 for a new file).
    pub revision: Revision,
    /// Every live key.
    pub keys: Vec<(String, Entry)>,
}

impl Journal {
    /// Open (or create) the journal at `path` and read it whole.
    pub fn open(path: &Path) -> Result<(Journal, Loaded), StoreError> {
        let failed = |what: &str, error: String| {
            StoreError::Unavailable(format!(
                "the durable store {}: {what}: {error}",
                path.display()
            ))
        };
        let db = Database::create(path).map_err(|e| failed("cannot open it", text(e)))?;
        let journal = Journal {
            db,
            path: path.to_path_buf(),
        };
        let loaded = journal.read().map_err(|e| failed("cannot read it", e))?;
        Ok((journal, loaded))
    }

    fn read(&self) -> Result<Loaded, String> {
        // Create the tables on first use, so that a read of a new file works.
        let txn = self.db.begin_write().map_err(text)?;
        txn.open_table(KEYS).map_err(text)?;
        txn.open_table(META).map_err(text)?;
        txn.commit().map_err(text)?;

        let txn = self.db.begin_read().map_err(text)?;
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

    /// Write revision `revision`'s events; an error names the file.
    pub fn record(&self, revision: Revision, events: &[StoredEvent]) -> Result<(), String> {
        self.write(revision, events).map_err(|error| {
            format!(
                "the durable store {} could not write revision {revision}: {error}",
                self.path.display()
            )
        })
    }

    fn write(&self, revision: Revision, events: &[StoredEvent]) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(text)?;
        {
            let mut keys = txn.open_table(KEYS).map_err(text)?;
            let mut row = Vec::new();
            for event in events {
                match &event.current {
                    Some(entry) => {
                        encode(entry, &mut row);
                        keys.insert(event.key.as_str(), row.as_slice())
                            .map_err(text)?;
                    }
                    None => {
                        keys.remove(event.key.as_str()).map_err(text)?;
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
