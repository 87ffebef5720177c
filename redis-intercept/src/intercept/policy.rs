//! Per-cgroup interception settings: set, cleared and reconciled with the config; the
//! deepest explicit setting wins in the kernel.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use redis_intercept_common as common;

use super::{InterceptError, Interceptor, Rule, cgroup_id, ebpf_err};

impl Interceptor {
    /// The absolute form of a cgroup path: as given if absolute, else under the cgroup2
    /// mount.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.mount.join(path)
        }
    }

    /// Sets (`Some`) or clears (`None`) the explicit setting of a cgroup. Returns its id.
    ///
    /// # Errors
    /// The path isn't a cgroup2 directory (when setting), or the map write failed.
    pub fn set(&mut self, path: &Path, on: Option<bool>) -> Result<u64, InterceptError> {
        let path = self.resolve(path);
        let mount = self.mount.clone();
        let known = self.rules.get(&path).map(|r| r.0);
        let mut map: HashMap<&mut MapData, u64, u32> = self.hash_map(common::CGROUP_POLICY_MAP)?;
        match on {
            Some(on) => {
                if !path.starts_with(&mount) {
                    return Err(InterceptError::Cgroup {
                        path,
                        why: format!("not under the cgroup2 mount {}", mount.display()),
                    });
                }
                let id = cgroup_id(&path)?;
                let value = if on {
                    common::POLICY_ON
                } else {
                    common::POLICY_OFF
                };
                map.insert(id, value, 0)
                    .map_err(|e| ebpf_err("write the cgroup policy", e))?;
                self.rules.insert(path, (id, on));
                Ok(id)
            }
            None => {
                let id = match known {
                    Some(id) => id,
                    None => cgroup_id(&path)?,
                };
                // Clearing a setting that isn't there is fine.
                let _ = map.remove(&id);
                self.rules.remove(&path);
                Ok(id)
            }
        }
    }

    /// Applies a reloaded file's `default` and `enable`/`disable` lists. The default policy
    /// changes; a setting the old file made and the new one drops is cleared; a setting the
    /// new file adds or changes is made, and so is one the file had but that isn't in force
    /// (its cgroup didn't exist before). A setting changed at run time (`redis-intercept
    /// cgroup`) for a cgroup whose line in the file didn't change stays. Returns why a
    /// setting could not be made (a cgroup that doesn't exist yet, say); the rest are made.
    ///
    /// # Errors
    /// The settings map can't be written.
    pub fn reconcile(
        &mut self,
        default_on: bool,
        rules: Vec<(PathBuf, bool)>,
    ) -> Result<Vec<String>, InterceptError> {
        if default_on != self.plan.default_on {
            self.plan.default_on = default_on;
            self.write_settings()?;
        }
        let old = std::mem::replace(&mut self.plan.rules, rules.clone());
        for (path, _) in &old {
            if !rules.iter().any(|(p, _)| p == path) {
                // Gone with its cgroup is as good as cleared.
                let _ = self.set(path, None);
            }
        }
        let mut problems = Vec::new();
        for (path, on) in rules {
            let unchanged = old.contains(&(path.clone(), on));
            if unchanged && self.rules.contains_key(&self.resolve(&path)) {
                continue;
            }
            if let Err(e) = self.set(&path, Some(on)) {
                problems.push(format!("[intercept] setting not applied: {e}"));
            }
        }
        Ok(problems)
    }

    /// Every explicit setting.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .map(|(path, &(id, on))| Rule {
                path: path.clone(),
                id,
                on,
                exists: cgroup_id(path).is_ok_and(|now| now == id),
            })
            .collect()
    }
}
