//! A service's command policy (`[service.acl] rules`), in Redis's ACL rule syntax for
//! commands: `+cmd`, `-cmd`, `+cmd|sub`, `-cmd|sub`, `+@category`, `-@category`,
//! `allcommands` and `nocommands`, applied left to right as `ACL SETUSER` applies them.

use std::collections::HashSet;

use super::{CommandInfo, all};

/// Redis 7.0's ACL categories, in the order `ACL CAT` lists them.
pub const CATEGORIES: &[&str] = &[
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

/// Which commands a service's clients may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// The rules as written (for errors and the config dump).
    pub rules: String,
    /// Full names (`get`, `config|set`) of the commands the rules refuse.
    denied: HashSet<&'static str>,
}

impl Acl {
    /// Compiles `rules`.
    ///
    /// # Errors
    /// The first rule that names no command or category, or isn't a rule, in words like
    /// Redis's.
    pub fn compile(rules: &str) -> Result<Acl, String> {
        // Every command and subcommand, by full name, with its container's name.
        let mut allowed: Vec<(&'static CommandInfo, &'static str, bool)> = Vec::new();
        for c in all() {
            let container = c.info.name.split('|').next().unwrap_or(c.info.name);
            allowed.push((c.info, container, false));
        }
        for rule in rules.split_whitespace() {
            let lower = rule.to_ascii_lowercase();
            let (on, what) = match lower.as_str() {
                "allcommands" => (true, "@all"),
                "nocommands" => (false, "@all"),
                r if r.starts_with('+') => (true, &r[1..]),
                r if r.starts_with('-') => (false, &r[1..]),
                _ => {
                    return Err(format!(
                        "'{rule}' is not a command rule (+cmd, -cmd, +@category, -@category)"
                    ));
                }
            };
            let mut matched = false;
            if let Some(cat) = what.strip_prefix('@') {
                if cat != "all" && !CATEGORIES.contains(&cat) {
                    return Err(format!("Unknown command or category name in ACL: '{rule}'"));
                }
                for (info, _, a) in &mut allowed {
                    if cat == "all" || info.acl_categories.contains(&cat) {
                        *a = on;
                        matched = true;
                    }
                }
            } else {
                for (info, container, a) in &mut allowed {
                    if info.name == what || (!what.contains('|') && *container == what) {
                        *a = on;
                        matched = true;
                    }
                }
            }
            if !matched {
                return Err(format!("Unknown command or category name in ACL: '{rule}'"));
            }
        }
        let denied = allowed
            .into_iter()
            .filter(|(_, _, a)| !a)
            .map(|(info, _, _)| info.name)
            .collect();
        Ok(Acl {
            rules: rules.to_owned(),
            denied,
        })
    }

    /// Whether the rules let a client run `info` (a command, or a subcommand's entry).
    pub fn allows(&self, info: &CommandInfo) -> bool {
        !self.denied.contains(info.name)
    }
}

/// The full names of the commands and subcommands in `category`, for `ACL CAT category`;
/// `None` for an unknown category.
pub fn commands_in(category: &str) -> Option<Vec<&'static str>> {
    let category = category.to_ascii_lowercase();
    if !CATEGORIES.contains(&category.as_str()) {
        return None;
    }
    Some(
        all()
            .filter(|c| c.info.acl_categories.contains(&category.as_str()))
            .map(|c| c.info.name)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::by_name;

    #[test]
    fn rules_apply_left_to_right_with_categories_and_subcommands() {
        let acl = Acl::compile("+@all -@admin -flushall +config|get").unwrap();
        let allows = |name: &str| acl.allows(by_name(name).unwrap().info);
        assert!(allows("get"));
        assert!(!allows("flushall"));
        assert!(!allows("config|set"));
        assert!(allows("config|get"));
        assert!(!allows("debug"));
        let none = Acl::compile("nocommands +get").unwrap();
        assert!(none.allows(by_name("get").unwrap().info));
        assert!(!none.allows(by_name("set").unwrap().info));
        assert!(Acl::compile("+nosuch").is_err());
        assert!(Acl::compile("+@nosuch").is_err());
        assert!(Acl::compile("get").is_err());
    }
}
