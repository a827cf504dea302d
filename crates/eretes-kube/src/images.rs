//! [`AllowImages`]: the images an agent may run Jobs of
//! (`eretes agent --kubernetes --allow-images ...`).

/// The images an agent runs; every other image is refused, and an empty
/// list refuses them all.
///
/// An entry that ends with `/` allows every image under it (a registry,
/// `registry.example.com/`, or a repository path,
/// `registry.example.com/team/`); any other entry allows exactly that
/// reference (`busybox:1.36`, or a digest `busybox@sha256:...`). Because a
/// prefix ends with `/`, `registry.example.com/` does not allow
/// `registry.example.com.evil.net/x`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowImages {
    entries: Vec<String>,
}

/// An `--allow-images` entry that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--allow-images entry {0:?} is not an image or a prefix ending with '/'")]
pub struct AllowImagesError(pub String);

impl AllowImages {
    /// The list of `entries`, each checked.
    pub fn new<I, S>(entries: I) -> Result<Self, AllowImagesError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list = Vec::new();
        for entry in entries {
            let entry: String = entry.into();
            let valid = !entry.is_empty()
                && entry != "/"
                && entry.len() <= crate::spec::MAX_IMAGE_BYTES
                && !entry.chars().any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return Err(AllowImagesError(entry));
            }
            list.push(entry);
        }
        Ok(AllowImages { entries: list })
    }

    /// Whether `image` may run.
    pub fn allows(&self, image: &str) -> bool {
        self.entries.iter().any(|entry| {
            if entry.ends_with('/') {
                image.len() > entry.len() && image.starts_with(entry.as_str())
            } else {
                image == entry
            }
        })
    }

    /// Whether the list allows nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_entries_and_prefixes() {
        let allow = AllowImages::new(["busybox:1.36", "registry.example.com/team/"]).unwrap();
        assert!(allow.allows("busybox:1.36"));
        assert!(!allow.allows("busybox:1.37"));
        assert!(!allow.allows("busybox"));
        assert!(allow.allows("registry.example.com/team/report:2"));
        assert!(!allow.allows("registry.example.com/team/"));
        assert!(!allow.allows("registry.example.com/other/x"));
        assert!(!allow.allows("registry.example.com/team.evil/x"));
        assert!(!AllowImages::default().allows("busybox:1.36"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["", "/", "a b", "x\n"] {
            assert_eq!(AllowImages::new([bad]), Err(AllowImagesError(bad.into())));
        }
    }
}
