//! Reloads the proxy when its config file, or a client password or upstream TLS file the
//! config names, has changed (`[proxy] watch_config`): Kubernetes updates a mounted
//! ConfigMap or Secret in place and sends no signal. Also the hash a reload compares to see
//! whether an upstream's TLS files changed.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::Proxy;
use crate::config::{Config, UpstreamConfig};

/// The files as they were at the last look.
pub(super) struct Watch {
    /// The config file.
    path: PathBuf,
    /// The files the running config names that a reload reads.
    files: Vec<PathBuf>,
    /// A hash of the config file and of those files.
    last: u64,
}

impl Watch {
    /// Starts from the files as they are now.
    pub(super) fn new(path: &Path, files: Vec<PathBuf>) -> Watch {
        Watch {
            last: fingerprint(std::iter::once(path).chain(files.iter().map(PathBuf::as_path))),
            path: path.to_owned(),
            files,
        }
    }

    /// Whether a file changed since the last look; remembers what it saw.
    pub(super) fn changed(&mut self) -> bool {
        let now = fingerprint(
            std::iter::once(self.path.as_path()).chain(self.files.iter().map(PathBuf::as_path)),
        );
        std::mem::replace(&mut self.last, now) != now
    }

    /// After a reload: when the new config names other files (a new password file), they
    /// are looked at from now on, as they are now. Otherwise what was seen before the reload
    /// stays the baseline, so a change made while the reload ran is still seen at the next
    /// look (looking again here would take it as seen without applying it).
    pub(super) fn reloaded(&mut self, proxy: &Proxy) {
        let files = proxy.watched_files();
        if files != self.files {
            self.files = files;
            self.changed();
        }
    }
}

/// A hash of the files' paths and bytes (a file that can't be read hashes as its error, so
/// its return counts as a change too). Contents, not times: a ConfigMap update swaps a
/// symlink, and a file may be rewritten within one second.
pub(super) fn fingerprint<'a>(paths: impl Iterator<Item = &'a Path>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut h);
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

/// The files `config` names that a reload reads: client password files and upstream TLS
/// files.
pub(super) fn watched(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = config
        .services
        .iter()
        .filter_map(|s| s.auth.as_ref()?.password_file.clone())
        .collect();
    out.extend(config.upstreams.iter().flat_map(tls_files));
    out
}

/// The TLS files of `up` (CA bundle, client certificate and key).
pub(super) fn tls_files(up: &UpstreamConfig) -> Vec<PathBuf> {
    up.tls
        .iter()
        .flat_map(|t| [&t.ca_file, &t.client_cert_file, &t.client_key_file])
        .flatten()
        .cloned()
        .collect()
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
        let first = fingerprint([conf.as_path(), secret.as_path()].into_iter());
        assert_eq!(
            fingerprint([conf.as_path(), secret.as_path()].into_iter()),
            first
        );
        std::fs::write(&secret, "two").unwrap();
        let second = fingerprint([conf.as_path(), secret.as_path()].into_iter());
        assert_ne!(second, first);
        std::fs::remove_file(&conf).unwrap();
        let gone = fingerprint([conf.as_path(), secret.as_path()].into_iter());
        assert_ne!(gone, second);
        std::fs::write(&conf, "a").unwrap();
        assert_eq!(
            fingerprint([conf.as_path(), secret.as_path()].into_iter()),
            second
        );
        // Naming another file is a change even when both read the same.
        assert_ne!(fingerprint([conf.as_path()].into_iter()), second);
    }
}
