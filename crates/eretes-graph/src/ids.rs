//! Names and numbers of the graph layer, and its key layout.
//!
//! Two epochs live side by side and are never mixed up:
//! - the **job epoch** ([`JobEpoch`]): the phase a whole job is in, moved
//!   forward by its tasks with a compare-and-swap (`graph/epochs/<job>`);
//! - the **claim epoch**: the fencing epoch of one run of one task (the
//!   store revision of its claim, `TaskContext::epoch`), which guards every
//!   write that run makes.

use std::fmt;

use eretes_protocol::{Namespace, NodeName, TaskId};
use serde::{Deserialize, Serialize};

use crate::GraphError;

/// A job's name: 1–64 of `A-Z a-z 0-9 _ -` (no `.`: task ids are
/// `<job>.<index>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobName(String);

impl JobName {
    /// Longest job name.
    pub const MAX_LEN: usize = 64;

    /// `name`, if it is a valid job name.
    pub fn new(name: impl Into<String>) -> Result<JobName, GraphError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(JobName(name))
        } else {
            Err(GraphError::Invalid(format!(
                "job name {:?}: 1-{} of A-Z a-z 0-9 _ - are allowed",
                name.chars().take(80).collect::<String>(),
                Self::MAX_LEN
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobName {
    type Error = GraphError;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        JobName::new(name)
    }
}

impl From<JobName> for String {
    fn from(name: JobName) -> String {
        name.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The phase a job is in: every task enters each job epoch once, in order;
/// work of an earlier job epoch is never delivered into a later one. Not
/// the claim (fencing) epoch of a task's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobEpoch(pub u64);

impl fmt::Display for JobEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job epoch {}", self.0)
    }
}

/// The eretes task id of task `index` of `job`: `<job>.<index>`.
pub fn graph_task_id(job: &JobName, index: u32) -> TaskId {
    TaskId::new(format!("{job}.{index}")).expect("job names and numbers make valid task ids")
}

/// The job and index of a graph task id, if it is one.
pub fn parse_graph_task_id(id: &TaskId) -> Option<(JobName, u32)> {
    let (job, index) = id.as_str().rsplit_once('.')?;
    Some((JobName::new(job).ok()?, parse_index(index)?))
}

/// A task index in its one spelling (no sign, no leading zeros).
fn parse_index(text: &str) -> Option<u32> {
    let index: u32 = text.parse().ok()?;
    (index.to_string() == text).then_some(index)
}

/// Where the graph layer keeps its records, under `<ns>/graph/`.
#[derive(Debug, Clone)]
pub struct GraphKeys {
    root: String,
}

/// What a key under `<ns>/graph/` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphKey {
    /// `jobs/<job>`: the job's record.
    Job(JobName),
    /// `epochs/<job>`: the job's current epoch.
    Epoch(JobName),
    /// `meta/<job>/<task>/<link>`: the meta a task last flagged on a link.
    Meta(JobName, u32, String),
    /// `rpc/<node>`: the address a node serves data requests on.
    Rpc(NodeName),
    /// `backups/<job>/<task>/<node>`: `node` holds a backup of the task
    /// (under its own lease).
    Backup(JobName, u32, NodeName),
}

impl GraphKeys {
    /// The keys of namespace `ns`.
    pub fn new(ns: &Namespace) -> GraphKeys {
        GraphKeys {
            root: ns.graph_prefix(),
        }
    }

    /// Everything of the graph layer.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `jobs/<job>`.
    pub fn job(&self, job: &JobName) -> String {
        format!("{}jobs/{job}", self.root)
    }

    /// `epochs/<job>`.
    pub fn epoch(&self, job: &JobName) -> String {
        format!("{}epochs/{job}", self.root)
    }

    /// `meta/<job>/<task>/<link>`.
    pub fn meta(&self, job: &JobName, task: u32, link: &str) -> String {
        format!("{}meta/{job}/{task}/{link}", self.root)
    }

    /// `meta/<job>/`: every meta of a job.
    pub fn metas(&self, job: &JobName) -> String {
        format!("{}meta/{job}/", self.root)
    }

    /// `rpc/<node>`.
    pub fn rpc(&self, node: &NodeName) -> String {
        format!("{}rpc/{node}", self.root)
    }

    /// `backups/<job>/<task>/<node>`.
    pub fn backup(&self, job: &JobName, task: u32, node: &NodeName) -> String {
        format!("{}backups/{job}/{task}/{node}", self.root)
    }

    /// `backups/<job>/<task>/`: every backup of a task.
    pub fn backups_of(&self, job: &JobName, task: u32) -> String {
        format!("{}backups/{job}/{task}/", self.root)
    }

    /// `backups/<job>/`: every backup of a job's tasks.
    pub fn backups(&self, job: &JobName) -> String {
        format!("{}backups/{job}/", self.root)
    }

    /// What `key` holds; `None` for a key of another shape (counted as
    /// malformed by whoever reads it).
    pub fn parse(&self, key: &str) -> Option<GraphKey> {
        let rest = key.strip_prefix(self.root.as_str())?;
        if let Some(job) = rest.strip_prefix("jobs/") {
            return Some(GraphKey::Job(JobName::new(job).ok()?));
        }
        if let Some(job) = rest.strip_prefix("epochs/") {
            return Some(GraphKey::Epoch(JobName::new(job).ok()?));
        }
        if let Some(node) = rest.strip_prefix("rpc/") {
            return Some(GraphKey::Rpc(NodeName::new(node).ok()?));
        }
        if let Some(backup) = rest.strip_prefix("backups/") {
            let mut parts = backup.split('/');
            let (job, task, node) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            return Some(GraphKey::Backup(
                JobName::new(job).ok()?,
                parse_index(task)?,
                NodeName::new(node).ok()?,
            ));
        }
        let mut parts = rest.strip_prefix("meta/")?.split('/');
        let (job, task, link) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !valid_link(link) {
            return None;
        }
        Some(GraphKey::Meta(
            JobName::new(job).ok()?,
            task.parse().ok()?,
            link.to_string(),
        ))
    }
}

/// A link type's name: 1–32 of `a-z 0-9 _ -`.
pub fn valid_link(link: &str) -> bool {
    !link.is_empty()
        && link.len() <= 32
        && link
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_and_others_are_not_graph_tasks() {
        let job = JobName::new("regression").unwrap();
        let id = graph_task_id(&job, 14);
        assert_eq!(id.as_str(), "regression.14");
        assert_eq!(parse_graph_task_id(&id), Some((job, 14)));
        for other in ["backup", "a.b", "job.01", "job.-1", "job.", ".3"] {
            let Ok(id) = TaskId::new(other) else { continue };
            assert_eq!(parse_graph_task_id(&id), None, "{other}");
        }
        assert!(JobName::new("has.dot").is_err());
        assert!(JobName::new("").is_err());
        assert!(JobName::new("x".repeat(65)).is_err());
    }

    #[test]
    fn keys_parse_back_and_garbage_does_not() {
        let keys = GraphKeys::new(&Namespace::new("ns").unwrap());
        let job = JobName::new("j").unwrap();
        let node = NodeName::new("n1").unwrap();
        assert_eq!(
            keys.parse(&keys.job(&job)),
            Some(GraphKey::Job(job.clone()))
        );
        assert_eq!(
            keys.parse(&keys.epoch(&job)),
            Some(GraphKey::Epoch(job.clone()))
        );
        assert_eq!(
            keys.parse(&keys.meta(&job, 3, "parent")),
            Some(GraphKey::Meta(job.clone(), 3, "parent".into()))
        );
        assert_eq!(
            keys.parse(&keys.backup(&job, 7, &node)),
            Some(GraphKey::Backup(job.clone(), 7, node.clone()))
        );
        assert!(keys
            .backup(&job, 7, &node)
            .starts_with(&keys.backups_of(&job, 7)));
        assert_eq!(keys.parse(&keys.rpc(&node)), Some(GraphKey::Rpc(node)));
        for garbage in [
            "jobs/",
            "meta/j/x/parent",
            "meta/j/1/Parent",
            "meta/j/1/p/q",
            "what/j",
            "backups/j/1",
            "backups/j/01/n1",
            "backups/j/1/n1/x",
        ] {
            assert_eq!(
                keys.parse(&format!("ns/graph/{garbage}")),
                None,
                "{garbage}"
            );
        }
    }
}
