//! Reloads the proxy when its config file, or a client password file the config names, has
//! changed (`[proxy] watch_config`): Kubernetes updates a mounted ConfigMap or Secret in
//! place and sends no signal.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::Proxy;

/// The files as they were at the last look.
pub(super) struct Watch {
    /// The config file.
    path: PathBuf,
    /// A hash of the config file and of every client password file it names.
    last: u64,
}

impl Watch {
    /// Starts from the files as they are now.
    pub(super) fn new(path: &Path, proxy: &Proxy) -> Watch {
        Watch {
            path: path.to_owned(),
            last: fingerprint(path, &proxy.client_password_files()),
        }
    }

    /// Whether a file changed since the last look; remembers what it saw. After a reload,
    /// call it once more so the reload's own files (a new password file) count as seen.
    pub(super) fn changed(&mut self, proxy: &Proxy) -> bool {
        let now = fingerprint(&self.path, &proxy.client_password_files());
        std::mem::replace(&mut self.last, now) != now
    }
}

/// A hash of the files' bytes (a file that can't be read hashes as its error, so its
/// return counts as a change too). Contents, not times: a ConfigMap update swaps a
/// symlink, and a file may be rewritten within one second.
fn fingerprint(config: &Path, others: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in std::iter::once(config).chain(others.iter().map(PathBuf::as_path)) {
        path.hash(&mut h);
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_follows_contents_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("c.toml");
        let secret = dir.path().join("pw");
        std::fs::write(&conf, "a").unwrap();
        std::fs::write(&secret, "one").unwrap();
        let list = [secret.clone()];
        let first = fingerprint(&conf, &list);
        assert_eq!(fingerprint(&conf, &list), first);
        std::fs::write(&secret, "two").unwrap();
        let second = fingerprint(&conf, &list);
        assert_ne!(second, first);
        std::fs::remove_file(&conf).unwrap();
        let gone = fingerprint(&conf, &list);
        assert_ne!(gone, second);
        std::fs::write(&conf, "a").unwrap();
        assert_eq!(fingerprint(&conf, &list), second);
        // Naming another file is a change even when both read the same.
        assert_ne!(fingerprint(&conf, &[]), second);
    }
}
