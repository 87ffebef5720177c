//! The cgroup2 filesystem: where it is mounted (hybrid hosts mount it at
//! `/sys/fs/cgroup/unified`), and a cgroup's id (its directory's inode).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{InterceptError, ebpf_err};

/// The cgroup2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on hybrid ones).
///
/// # Errors
/// No cgroup2 file system is mounted.
pub fn cgroup2_mount() -> Result<PathBuf, InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| ebpf_err("read /proc/self/mountinfo", e))?;
    cgroup2_mount_in(&info).ok_or_else(|| InterceptError::Cgroup {
        path: PathBuf::from("/proc/self/mountinfo"),
        why: "no cgroup2 file system is mounted".to_owned(),
    })
}

/// The first cgroup2 mount point in mountinfo text.
pub(super) fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Field 5 is the mount point; spaces and the like are octal-escaped.
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount(mount)))
    })
}

/// Undoes mountinfo's `\040`-style escapes.
pub(super) fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup's id as the kernel's cgroup-id helpers give it: the inode of its directory.
///
/// # Errors
/// The directory doesn't exist or isn't a cgroup2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, InterceptError> {
    let meta = std::fs::metadata(path).map_err(|e| InterceptError::Cgroup {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if !meta.is_dir() || !path.join("cgroup.procs").exists() {
        return Err(InterceptError::Cgroup {
            path: path.to_owned(),
            why: "not a cgroup2 directory".to_owned(),
        });
    }
    Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn finds_the_cgroup2_mount_on_hybrid_and_pure_hosts() {
        let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                      27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount_in(spaced), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }
}
