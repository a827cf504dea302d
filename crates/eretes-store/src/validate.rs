//! Request checks every backend applies before it touches its data, so that
//! a bad request fails the same way (and writes nothing) on every backend.
//! They follow etcd's own checks and messages; the etcd backend runs them
//! client-side too, so its errors match the embedded store's exactly.

use crate::{KeyRange, StoreError, StoreResult, Txn, TxnOp};

pub(crate) fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::InvalidArgument(message.into())
}

/// An empty key is invalid, as in etcd ("key is not provided").
pub fn check_key(key: &str) -> StoreResult<()> {
    if key.is_empty() {
        Err(invalid("key is not provided (empty key)"))
    } else {
        Ok(())
    }
}

/// A single-key range must name a key; a prefix may be empty (everything);
/// a span must name its first key and end after it.
pub fn check_range(range: &KeyRange) -> StoreResult<()> {
    match range {
        KeyRange::Key(key) => check_key(key),
        // An empty prefix is the whole key space, as etcd's "\0" range end.
        KeyRange::Prefix(_) => Ok(()),
        KeyRange::Span { start, end } => {
            check_key(start)?;
            if end <= start {
                // etcd reads such a range as empty; asking for one is a bug.
                return Err(invalid(format!(
                    "the range's end {end:?} is not after its start {start:?}"
                )));
            }
            Ok(())
        }
    }
}

/// etcd's `checkIntervals`: within one branch, no key may be put twice and
/// no put may fall inside a delete's range (deletes may overlap each other).
/// Checked for both branches before anything runs, as etcd does.
fn check_branch(ops: &[TxnOp]) -> StoreResult<()> {
    let mut puts: Vec<&str> = Vec::new();
    let mut has_delete = false;
    for op in ops {
        match op {
            TxnOp::Get(get) => check_range(&get.range)?,
            TxnOp::Put(put) => {
                check_key(&put.key)?;
                puts.push(&put.key);
            }
            TxnOp::Delete(delete) => {
                check_range(&delete.range)?;
                has_delete = true;
            }
        }
    }
    if puts.len() <= 1 && !has_delete {
        return Ok(());
    }
    let duplicate = |key: &str| invalid(format!("duplicate key given in txn request: {key:?}"));
    puts.sort_unstable();
    if let Some(pair) = puts.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(duplicate(pair[0]));
    }
    for op in ops {
        if let TxnOp::Delete(delete) = op {
            match &delete.range {
                KeyRange::Key(key) => {
                    if puts.binary_search(&key.as_str()).is_ok() {
                        return Err(duplicate(key));
                    }
                }
                range => {
                    let first = puts.partition_point(|put| *put < range.start());
                    if let Some(put) = puts.get(first).filter(|put| range.contains(put)) {
                        return Err(duplicate(put));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Every check etcd applies to a transaction, in etcd's order: the number of
/// operations (at most `max_ops` compares and per branch), empty keys, then
/// duplicate keys within a branch.
pub fn check_txn(txn: &Txn, max_ops: usize) -> StoreResult<()> {
    let ops = txn
        .compares
        .len()
        .max(txn.success.len())
        .max(txn.failure.len());
    if ops > max_ops {
        return Err(invalid(format!(
            "too many operations in txn request ({ops} > {max_ops})"
        )));
    }
    for compare in &txn.compares {
        check_key(&compare.key)?;
    }
    check_branch(&txn.success)?;
    check_branch(&txn.failure)
}
