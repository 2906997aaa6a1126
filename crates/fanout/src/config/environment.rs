//! The environment's `FANOUT_*` variables, checked before anything is read:
//! each must name a key, so a mistyped one stops the command with its name
//! and the closest key's, rather than leaving a setting at its default
//! unnoticed. `FANOUT_DEV_*` is reserved for the project's own scripts and
//! tests (emulator ports, the binary to run) and ignored.

use super::keys::keys;
use super::{ConfigError, ENV_PREFIX, env_name};

/// The prefix fanout ignores.
pub const DEV_PREFIX: &str = "FANOUT_DEV_";

/// Fails on the first (in name order) `FANOUT_*` variable among `names`
/// that is neither a key's nor reserved.
pub(super) fn check<I>(names: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = String>,
{
    let known: Vec<String> = keys().iter().map(|key| env_name(key)).collect();
    let unknown = names
        .into_iter()
        .filter(|name| {
            name.starts_with(ENV_PREFIX) && !name.starts_with(DEV_PREFIX) && !known.contains(name)
        })
        .min();
    match unknown {
        None => Ok(()),
        Some(name) => {
            let closest = known
                .iter()
                .min_by_key(|key| edit_distance(&name, key))
                .cloned()
                .unwrap_or_default();
            Err(ConfigError::UnknownVariable { name, closest })
        }
    }
}

/// Levenshtein distance: the fewest single-character insertions, deletions
/// and substitutions that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        for (a, b, distance) in [
            ("", "", 0),
            ("abc", "abc", 0),
            ("abc", "", 3),
            ("RATE_PER_SECCOND", "RATE_PER_SECOND", 1),
            ("kitten", "sitting", 3),
            ("TABEL", "TABLE", 2),
        ] {
            assert_eq!(edit_distance(a, b), distance, "{a} → {b}");
            assert_eq!(edit_distance(b, a), distance, "{b} → {a}");
        }
    }

    #[test]
    fn keys_other_variables_and_the_reserved_prefix_pass() {
        check(names(&[
            "FANOUT_QUEUE_URL",
            "FANOUT_RATE_PER_SECOND",
            "FANOUT_DEV_EMU_SQS_PORT",
            "PATH",
            "AWS_REGION",
            "MY_FANOUT_THING",
        ]))
        .expect("all known or not ours");
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_closest_key() {
        for (mistyped, closest) in [
            ("FANOUT_RATE_PER_SECCOND", "FANOUT_RATE_PER_SECOND"),
            ("FANOUT_QUEUE_ULR", "FANOUT_QUEUE_URL"),
            ("FANOUT_TABEL", "FANOUT_TABLE"),
            ("FANOUT_HEARTBEAT_INTERVALL", "FANOUT_HEARTBEAT_INTERVAL"),
            ("FANOUT_MAX_INFLIGHT", "FANOUT_MAX_IN_FLIGHT"),
        ] {
            let err = check(names(&["FANOUT_QUEUE_URL", mistyped])).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, ConfigError::UnknownVariable { name, closest: c } if name == mistyped && c == closest),
                "{mistyped}: {text}"
            );
            assert!(text.contains(mistyped) && text.contains(closest), "{text}");
            assert!(!text.contains('\n'), "one line: {text}");
        }
    }

    #[test]
    fn the_first_unknown_variable_by_name_is_reported() {
        let err = check(names(&["FANOUT_ZZZ", "FANOUT_AAA"])).unwrap_err();
        assert!(err.to_string().contains("FANOUT_AAA"), "{err}");
    }
}
