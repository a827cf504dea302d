//! A node's listing: the keys its cache keeps, read kind by kind.
//!
//! A node acts on nodes, its own command queue, tasks, owners, run records
//! and task commands. Results, states, checkpoints and the task graph's keys grow
//! with the cluster's history and its checkpoints, not with the work a node
//! can take; a node reads none of them when it lists (first, after a watch
//! interruption, and every resync). Reading the whole namespace did, and at
//! a million finished tasks every node read a million results every 30 s.
//!
//! A node's watch follows one range, from `node-commands/` through `tasks/`
//! ([`Coordinator::node_watch_range`]). It holds every kind the node lists
//! but run records, and the few kinds that sort among them (results,
//! states, other nodes' command queues), which the node skips. It leaves
//! out checkpoints and the task graph's keys: what running tasks write as
//! they progress reaches the nodes that read it, not every node of the
//! cluster. It leaves out run records (`claims/`) too: every claim writes
//! one, and only the claimant needs it; a node reads a task's run record
//! before it claims a task that was owned since its listing (see the
//! runtime's cache).
//!
//! Each kind is one prefix read, so each has its own revision: no store
//! call reads several prefixes at one revision. A watch that continues the
//! listing starts after the first read's revision, and an event continues
//! the listing only when it is newer than the read of its kind
//! ([`NodeListing::is_newer`]); older events are in the listing already.

use eretes_store::{prefix_end, KeyRange, KeyValue, Revision, StoreExt, WatchStream};

use crate::coordinator::Coordinator;
use crate::error::ProtocolError;
use crate::ids::NodeName;

/// What a node's listing read: every key, and the revision of each prefix's read.
#[derive(Debug, Default)]
pub struct NodeListing {
    /// Every key read, prefix after prefix.
    pub kvs: Vec<KeyValue>,
    /// Each prefix read and the store's revision at that read, in read order.
    reads: Vec<(String, Revision)>,
}

impl NodeListing {
    /// The revision of the first read: a watch from one past it misses
    /// nothing any read left out.
    pub fn first_revision(&self) -> Revision {
        self.reads.iter().map(|(_, r)| *r).min().unwrap_or(0)
    }

    /// The revision of the last read: every watch event past it is newer
    /// than the whole listing.
    pub fn last_revision(&self) -> Revision {
        self.reads.iter().map(|(_, r)| *r).max().unwrap_or(0)
    }

    /// The revision at which the keys of `key`'s kind were read, if the
    /// listing read them.
    pub fn revision_of(&self, key: &str) -> Option<Revision> {
        self.reads
            .iter()
            .find(|(prefix, _)| key.starts_with(prefix.as_str()))
            .map(|(_, revision)| *revision)
    }

    /// Whether a change of `key` at `revision` is news to this listing: true
    /// unless the listing read `key`'s kind at that revision or later.
    pub fn is_newer(&self, key: &str, revision: Revision) -> bool {
        self.revision_of(key).is_none_or(|read| revision > read)
    }
}

impl Coordinator {
    /// The prefixes a node's cache keeps (see the module's docs), in the
    /// order they are read: nodes, `node`'s command queue, tasks, owners,
    /// run records and task commands.
    ///
    /// Tasks before their owners and run records: a task submitted and
    /// claimed between two reads is then either missing (its put comes by
    /// the watch) or listed with its owner, never listed as unowned while
    /// it is owned, which would send the node after a claim that must fail
    /// (and take a batch's other claims down to one transaction each).
    pub fn node_listing_prefixes(&self, node: &NodeName) -> Vec<String> {
        let ns = self.namespace();
        vec![
            ns.nodes_prefix(),
            ns.node_commands(node),
            ns.tasks_prefix(),
            ns.owners_prefix(),
            ns.runs_prefix(),
            ns.task_commands_prefix(),
        ]
    }

    /// The keys a node's watch follows (see the module's docs): from the
    /// first key under `node-commands/` to the last under `tasks/`.
    pub fn node_watch_range(&self) -> KeyRange {
        let ns = self.namespace();
        let end = String::from_utf8(prefix_end(&ns.tasks_prefix()))
            .expect("a namespace's prefixes end with an ASCII '/'");
        KeyRange::span(ns.node_commands_prefix(), end)
    }

    /// Watch [`Coordinator::node_watch_range`] from `revision` on.
    pub async fn watch_for_node(&self, revision: Revision) -> Result<WatchStream, ProtocolError> {
        Ok(self
            .store()
            .watch(self.node_watch_range(), revision)
            .await?)
    }

    /// Read what `node`'s cache keeps, one prefix after another.
    pub async fn list_for_node(&self, node: &NodeName) -> Result<NodeListing, ProtocolError> {
        let mut listing = NodeListing::default();
        for prefix in self.node_listing_prefixes(node) {
            let response = self.store().get_prefix(&prefix).await?;
            listing.kvs.extend(response.kvs);
            listing.reads.push((prefix, response.revision));
        }
        Ok(listing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TaskId;
    use crate::keys::Namespace;
    use eretes_store::embedded::EmbeddedStore;
    use eretes_store::{PutRequest, Store};

    #[tokio::test]
    async fn a_node_lists_only_what_it_keeps_and_knows_each_reads_revision() {
        let store = EmbeddedStore::new();
        let ns = Namespace::new("n").unwrap();
        let coordinator = Coordinator::new(store.clone(), ns);
        let me = NodeName::new("me").unwrap();
        for key in [
            "n/nodes/me",
            "n/node-commands/me/1",
            "n/node-commands/other/1",
            "n/owners/a",
            "n/claims/a",
            "n/runs/b",
            "n/tasks/a",
            "n/task-commands/a/1",
            "n/results/b",
            "n/states/a",
            "n/checkpoints/a",
            "n/graph/jobs/j",
            "n/unknown/x",
            "o/tasks/a",
        ] {
            store.put(PutRequest::new(key, "v")).await.unwrap();
        }
        let listing = coordinator.list_for_node(&me).await.unwrap();
        let mut keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "n/claims/a",
                "n/node-commands/me/1",
                "n/nodes/me",
                "n/owners/a",
                "n/task-commands/a/1",
                "n/tasks/a"
            ]
        );
        let read = listing.revision_of("n/tasks/a").unwrap();
        assert!(!listing.is_newer("n/tasks/a", read));
        assert!(listing.is_newer("n/tasks/a", read + 1));
        // Kinds it did not read are always news.
        assert!(listing.is_newer("n/results/b", 1));
        assert_eq!(listing.revision_of("n/node-commands/other/1"), None);
        assert!(listing.first_revision() <= listing.last_revision());
    }

    #[test]
    fn a_nodes_watch_holds_what_it_lists_but_run_records_and_not_checkpoints_or_graphs() {
        let ns = Namespace::new("n").unwrap();
        let coordinator = Coordinator::new(EmbeddedStore::new(), ns.clone());
        let range = coordinator.node_watch_range();
        let (id, node) = (TaskId::new("a").unwrap(), NodeName::new("me").unwrap());
        let listed = [
            ns.node(&node),
            format!("{}1", ns.node_commands(&node)),
            ns.task(&id),
            ns.owner(&id),
            format!("{}1", ns.task_commands(&id)),
        ];
        for key in &listed {
            assert!(range.contains(key), "{key} is listed, so watched");
        }
        // Every prefix the node lists lies in the range, but the run records'.
        for prefix in coordinator.node_listing_prefixes(&node) {
            assert_eq!(
                range.contains(&prefix),
                prefix != ns.runs_prefix(),
                "{prefix}"
            );
        }
        for key in [
            ns.run(&id),
            ns.checkpoint(&id),
            format!("{}jobs/j", ns.graph_prefix()),
            "o/tasks/a".to_string(),
            "n/tasks0".to_string(),
        ] {
            assert!(!range.contains(&key), "{key} is not watched");
        }
    }
}
