//! The value types of the store interface: keys, ranges, compares, transactions,
//! leases and watch events. They mirror etcd v3's data model so that a backend
//! maps onto etcd one-to-one.

use std::time::Duration;

/// A store revision. Every write (put, delete, transaction with writes, lease
/// expiry that removes keys) advances the store's revision by exactly one.
/// Revision 1 is the revision of an empty store.
pub type Revision = i64;

/// A lease identifier. `0` is never a valid lease; it means "no lease".
pub type LeaseId = i64;

/// One stored key with its value and metadata, exactly as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation; 1 right after creation.
    pub version: i64,
    /// The lease the key is attached to, or 0.
    pub lease: LeaseId,
}

/// Which keys an operation touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// Exactly one key.
    Key(String),
    /// Every key that starts with this prefix. Prefixes used by eretes always
    /// end with `/`, so `tasks/a/` never matches `tasks/ab/`.
    Prefix(String),
    /// Every key from `start` (included) to `end` (excluded), in byte
    /// order: etcd's `[key, range_end)`. It takes several prefixes that sort
    /// next to each other in one range, so one watch can follow them and
    /// not the prefixes around them.
    Span {
        /// The first key of the range.
        start: String,
        /// The first key after the range.
        end: String,
    },
}

impl KeyRange {
    /// A single-key range.
    pub fn key(key: impl Into<String>) -> Self {
        KeyRange::Key(key.into())
    }

    /// A prefix range.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        KeyRange::Prefix(prefix.into())
    }

    /// The keys from `start` (included) to `end` (excluded).
    pub fn span(start: impl Into<String>, end: impl Into<String>) -> Self {
        KeyRange::Span {
            start: start.into(),
            end: end.into(),
        }
    }

    /// Whether `key` falls in this range.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeyRange::Key(k) => k == key,
            KeyRange::Prefix(p) => key.starts_with(p.as_str()),
            KeyRange::Span { start, end } => start.as_str() <= key && key < end.as_str(),
        }
    }

    /// The first key the range can hold: where a scan of it starts.
    pub fn start(&self) -> &str {
        match self {
            KeyRange::Key(key) | KeyRange::Prefix(key) | KeyRange::Span { start: key, .. } => key,
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix): its last byte below 0xff raised by one, the bytes
/// after it dropped. `[0]` (etcd's "to the end of the key space") when there
/// is no such byte, as for the empty prefix.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    /// The keys to read.
    pub range: KeyRange,
    /// At most this many keys, in key order; `None` for all of them.
    pub limit: Option<usize>,
    /// Return only the count (no key-values).
    pub count_only: bool,
}

impl GetRequest {
    /// Read every key of `range`.
    pub fn new(range: KeyRange) -> Self {
        GetRequest {
            range,
            limit: None,
            count_only: false,
        }
    }

    /// Read at most `limit` keys.
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Only count the keys.
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }
}

/// The answer to a [`GetRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResponse {
    /// The matching keys in key order (empty when `count_only`).
    pub kvs: Vec<KeyValue>,
    /// How many keys match the range, ignoring `limit`.
    pub count: usize,
    /// Whether `limit` cut the result short.
    pub more: bool,
    /// The store's revision when the read was served.
    pub revision: Revision,
}

/// A put of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutRequest {
    /// The key.
    pub key: String,
    /// The new value.
    pub value: Vec<u8>,
    /// Attach the key to this lease (0 = no lease). The lease must exist.
    pub lease: LeaseId,
    /// Return the previous key-value, if any.
    pub prev_kv: bool,
}

impl PutRequest {
    /// A plain put without lease.
    pub fn new(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
        }
    }

    /// Attach the key to `lease`.
    pub fn with_lease(mut self, lease: LeaseId) -> Self {
        self.lease = lease;
        self
    }

    /// Ask for the previous key-value.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

/// The answer to a [`PutRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResponse {
    /// The revision of this write.
    pub revision: Revision,
    /// The previous key-value, when asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// A delete of one key or a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteRequest {
    /// The keys to delete.
    pub range: KeyRange,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

impl DeleteRequest {
    /// Delete `range`.
    pub fn new(range: KeyRange) -> Self {
        DeleteRequest {
            range,
            prev_kv: false,
        }
    }

    /// Ask for the deleted key-values.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

/// The answer to a [`DeleteRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteResponse {
    /// The store's revision after the delete (unchanged when nothing was deleted).
    pub revision: Revision,
    /// How many keys were deleted.
    pub deleted: i64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// How a compare relates the stored field to the given operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// stored == operand
    Equal,
    /// stored != operand
    NotEqual,
    /// stored < operand
    Less,
    /// stored > operand
    Greater,
}

impl CompareOp {
    /// Apply the comparison to an ordering of stored vs operand.
    pub fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CompareOp::Equal => ord == Equal,
            CompareOp::NotEqual => ord != Equal,
            CompareOp::Less => ord == Less,
            CompareOp::Greater => ord == Greater,
        }
    }
}

/// The field of a key that a [`Compare`] looks at, with its operand.
///
/// Semantics of a missing key follow etcd: version, create_revision,
/// mod_revision and lease compare as 0; a value compare on a missing key is
/// always false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The value bytes (lexicographic).
    Value(Vec<u8>),
    /// The key's version.
    Version(i64),
    /// The key's create revision.
    CreateRevision(Revision),
    /// The key's mod revision.
    ModRevision(Revision),
    /// The key's lease.
    Lease(LeaseId),
}

/// One condition of a transaction, on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The relation.
    pub op: CompareOp,
    /// The field and the operand.
    pub target: CompareTarget,
}

impl Compare {
    /// A compare of `key` with `op` and `target`.
    pub fn new(key: impl Into<String>, op: CompareOp, target: CompareTarget) -> Self {
        Compare {
            key: key.into(),
            op,
            target,
        }
    }

    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::new(key, CompareOp::Equal, CompareTarget::Version(0))
    }

    /// The key exists.
    pub fn present(key: impl Into<String>) -> Self {
        Compare::new(key, CompareOp::Greater, CompareTarget::Version(0))
    }

    /// The key's mod revision equals `revision` (0 means: the key is absent).
    pub fn mod_revision_is(key: impl Into<String>, revision: Revision) -> Self {
        Compare::new(key, CompareOp::Equal, CompareTarget::ModRevision(revision))
    }

    /// The key's create revision equals `revision`.
    pub fn create_revision_is(key: impl Into<String>, revision: Revision) -> Self {
        Compare::new(
            key,
            CompareOp::Equal,
            CompareTarget::CreateRevision(revision),
        )
    }

    /// The key's value equals `value`.
    pub fn value_is(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Compare::new(key, CompareOp::Equal, CompareTarget::Value(value.into()))
    }
}

/// One operation inside a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// A range read.
    Get(GetRequest),
    /// A put.
    Put(PutRequest),
    /// A delete.
    Delete(DeleteRequest),
}

/// The result of one [`TxnOp`], in the same position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// Result of a get.
    Get(GetResponse),
    /// Result of a put.
    Put(PutResponse),
    /// Result of a delete.
    Delete(DeleteResponse),
}

/// An atomic transaction: if every compare holds, apply `success`, else
/// `failure`. All writes of the chosen branch share one new revision; a branch
/// without writes does not advance the revision.
///
/// As in etcd, one branch may not write the same key twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Operations applied when every compare holds.
    pub success: Vec<TxnOp>,
    /// Operations applied otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Add a compare.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Add an operation to the success branch.
    pub fn and_then(mut self, op: TxnOp) -> Self {
        self.success.push(op);
        self
    }

    /// Add an operation to the failure branch.
    pub fn or_else(mut self, op: TxnOp) -> Self {
        self.failure.push(op);
        self
    }
}

/// The answer to a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
    /// One response per operation of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
}

/// A freshly granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id.
    pub id: LeaseId,
    /// Its TTL as granted.
    pub ttl: Duration,
}

/// Whether a watch event is a put or a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted (explicitly or by lease expiry).
    Delete,
}

/// One change delivered by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change. For a delete: the key, empty value, and
    /// `mod_revision` = the revision of the delete.
    pub kv: KeyValue,
    /// The key-value before the change, if it existed.
    pub prev_kv: Option<KeyValue>,
}

/// What a watch stream yields: the events of one or more revisions, in
/// revision order, or an error that ends the stream.
pub type WatchBatch = Vec<WatchEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_last_byte_is_raised() {
        assert_eq!(prefix_end("ns/tasks/"), b"ns/tasks0");
        // Byte-wise, as etcd compares keys, even where the result is no
        // longer UTF-8.
        assert_eq!(prefix_end("a\u{7f}"), vec![b'a', 0x80]);
        // Nothing to raise: to the end of the key space, as etcd reads [0].
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn a_span_holds_its_start_and_not_its_end() {
        let span = KeyRange::span("b/", "c0");
        assert_eq!(span.start(), "b/");
        for (key, inside) in [("b", false), ("b/", true), ("c/zz", true), ("c0", false)] {
            assert_eq!(span.contains(key), inside, "{key}");
        }
    }
}
