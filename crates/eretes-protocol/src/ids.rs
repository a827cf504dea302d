//! Validated identifiers: task ids, node names and group names.
//!
//! Every identifier becomes part of a store key, so the alphabet excludes `/`
//! (a task id can never reach into another task's keys) and the length is
//! bounded (keys stay small).

use arcstr::ArcStr;
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::ProtocolError;

/// Longest accepted identifier, in characters.
pub const MAX_ID_LEN: usize = 128;

/// Checks that `value` is 1–128 characters of `[A-Za-z0-9._:-]`.
fn validate(kind: &'static str, value: &str) -> Result<(), ProtocolError> {
    let reason = if value.is_empty() {
        Some("must not be empty".to_string())
    } else if value.len() > MAX_ID_LEN {
        Some(format!(
            "is {} characters long; the limit is {MAX_ID_LEN}",
            value.len()
        ))
    } else if value == "." || value == ".." {
        // Ids also name files (an agent's task logs); these two name directories.
        Some("must not be \".\" or \"..\"".to_string())
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
            .map(|c| format!("contains {c:?}; only A-Z a-z 0-9 . _ : - are allowed"))
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(ProtocolError::InvalidId {
            kind,
            value: value.chars().take(MAX_ID_LEN + 8).collect(),
            reason,
        }),
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        // Shared text: a node holds each id in several maps at once, and a
        // clone is a reference count instead of an allocation. `ArcStr` is
        // one word (its length lives with the text), half of an `Arc<str>`,
        // which matters in maps holding an entry per running task.
        pub struct $name(ArcStr);

        impl $name {
            /// Validate and wrap `value` (1–128 characters of `[A-Za-z0-9._:-]`).
            pub fn new(value: impl Into<String>) -> Result<Self, ProtocolError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok($name(ArcStr::from(value)))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ProtocolError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                $name::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0.to_string()
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtocolError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                $name::new(value)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

identifier!(
    /// A task's id, unique within a namespace.
    TaskId,
    "task id"
);
identifier!(
    /// A node's name, unique among the live nodes of a namespace.
    NodeName,
    "node name"
);
identifier!(
    /// A consumer group: a task has exactly one; a node serves a set of them.
    GroupName,
    "group name"
);

impl GroupName {
    /// The group of tasks submitted without one.
    pub fn default_group() -> Self {
        // A static literal: no allocation, however many tasks use it.
        GroupName(arcstr::literal!("default"))
    }
}

impl Default for GroupName {
    fn default() -> Self {
        GroupName::default_group()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "A.b_c:d-9", &"x".repeat(128)] {
            assert!(TaskId::new(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        let err = TaskId::new("").unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{err}");
        let err = TaskId::new("x".repeat(129)).unwrap_err().to_string();
        assert!(err.contains("129 characters"), "{err}");
        let err = TaskId::new("a/b").unwrap_err().to_string();
        assert!(err.contains("'/'"), "{err}");
        let err = NodeName::new("n ode").unwrap_err().to_string();
        assert!(err.starts_with("invalid node name"), "{err}");
        for dots in [".", ".."] {
            let err = TaskId::new(dots).unwrap_err().to_string();
            assert!(err.contains("must not be \".\" or \"..\""), "{err}");
        }
        assert!(TaskId::new("...").is_ok() && TaskId::new(".hidden").is_ok());
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<TaskId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<TaskId>("\"not ok\"").is_err());
    }
}
