//! Running tasks as another user: who, looked up once in the user database.

use std::ffi::{CStr, CString};

use serde::{Deserialize, Serialize};

/// The user (and groups) a task's processes run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    /// The user's name.
    pub name: String,
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Every group it belongs to (the primary one included).
    pub groups: Vec<u32>,
    /// Its home directory (the task's `HOME`).
    pub home: String,
}

impl RunAs {
    /// Look `name` up in the user database (`getpwnam_r`, `getgrouplist`).
    pub fn lookup(name: &str) -> Result<RunAs, String> {
        let c_name =
            CString::new(name).map_err(|_| format!("user name {name:?} contains a NUL byte"))?;
        let mut entry: libc::passwd = unsafe_zeroed();
        let mut buffer = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; getpwnam_r writes the
        // entry and its strings into `entry` and `buffer`.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return Err(format!("no user {name:?} on this machine"));
        }
        // SAFETY: getpwnam_r succeeded, so pw_dir points at a C string in `buffer`.
        let home = unsafe { CStr::from_ptr(entry.pw_dir) }
            .to_string_lossy()
            .into_owned();
        let (uid, gid) = (entry.pw_uid, entry.pw_gid);
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most
        // that many and says how many there are.
        let rc =
            unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc < 0 {
            return Err(format!("user {name:?} is in more than 256 groups"));
        }
        groups.truncate(count.max(0) as usize);
        Ok(RunAs {
            name: name.to_string(),
            uid,
            gid,
            groups,
            home,
        })
    }
}

fn unsafe_zeroed() -> libc::passwd {
    // SAFETY: passwd is plain data (integers and pointers); all-zero is a
    // valid value that getpwnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_strangers_are_not() {
        let root = RunAs::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert!(RunAs::lookup("no-such-user-here")
            .unwrap_err()
            .contains("no user"));
        assert!(RunAs::lookup("a\0b").is_err());
    }
}
