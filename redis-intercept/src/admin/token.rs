//! The admin endpoint's bearer token (`[admin] token_file`): read from its file at every
//! request, so a rotated Secret takes effect at once, and compared in constant time.

use std::path::{Path, PathBuf};

/// Endpoints anyone who can reach the listener may use: probes and scrapers carry no token.
pub const OPEN_PATHS: [&str; 2] = ["/ready", "/metrics"];

/// The token a request must carry, when one is configured.
#[derive(Debug, Clone)]
pub struct Token {
    /// The file holding it (its first line, trimmed).
    file: PathBuf,
}

impl Token {
    /// The token in `file`, checked readable and not empty now, so a missing Secret fails
    /// start-up.
    ///
    /// # Errors
    /// The file can't be read, or holds no token.
    pub fn load(file: &Path) -> Result<Token, String> {
        let token = Token {
            file: file.to_owned(),
        };
        token.current()?;
        Ok(token)
    }

    /// The token as the file says now.
    fn current(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| format!("admin token_file {}: {e}", self.file.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() {
            return Err(format!(
                "admin token_file {} holds no token",
                self.file.display()
            ));
        }
        Ok(token)
    }

    /// Whether a request for `path` with this `Authorization` header value may go on. An
    /// unreadable token file lets nothing but the open paths through.
    pub fn allows(&self, path: &str, authorization: Option<&[u8]>) -> bool {
        if OPEN_PATHS.contains(&path) {
            return true;
        }
        let (Ok(token), Some(given)) = (self.current(), authorization) else {
            return false;
        };
        let Some(given) = given.strip_prefix(b"Bearer ") else {
            return false;
        };
        ct_eq(given, token.as_bytes())
    }
}

/// Compares two byte strings without an early exit on the first difference.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_open_paths_go_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let t = Token::load(&file).unwrap();
        assert!(t.allows("/ready", None));
        assert!(t.allows("/metrics", None));
        assert!(!t.allows("/config", None));
        assert!(!t.allows("/reload", Some(b"Bearer wrong")));
        assert!(!t.allows("/reload", Some(b"s3cret")));
        assert!(t.allows("/reload", Some(b"Bearer s3cret")));
        // Rotated: the new token works at once, the old one no more.
        std::fs::write(&file, "next\n").unwrap();
        assert!(t.allows("/cgroups", Some(b"Bearer next")));
        assert!(!t.allows("/cgroups", Some(b"Bearer s3cret")));
        // Gone: closed.
        std::fs::remove_file(&file).unwrap();
        assert!(!t.allows("/cgroups", Some(b"Bearer next")));
        assert!(t.allows("/ready", None));
    }

    #[test]
    fn an_empty_or_missing_file_fails_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        assert!(Token::load(&file).is_err());
        std::fs::write(&file, "\n").unwrap();
        assert!(Token::load(&file).unwrap_err().contains("holds no token"));
    }
}
