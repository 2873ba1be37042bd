//! The snapshot name rule, in one place so the API, the engine, the store and the guest
//! protocol all accept exactly the same names.
//!
//! A name is 1 to 64 bytes of `[A-Za-z0-9._-]` and does not start with `.`. Names appear
//! in URL paths, in file names of exports and in log lines, so the rule keeps them free of
//! separators, spaces, percent signs and control characters without any escaping.
//!
//! This module depends on nothing but `thiserror`, so it can move to a lower crate (for
//! example `pmem-backend`) unchanged if the store wants to own the rule.

use thiserror::Error;

/// Longest accepted snapshot name, in bytes (all accepted characters are ASCII).
pub const MAX_NAME_LEN: usize = 64;

/// Why a snapshot name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("snapshot name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("snapshot name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// Length of the refused name in bytes.
        len: usize,
    },
    /// The name starts with `.` (reserved, and hidden as a file name).
    #[error("snapshot name must not start with '.'")]
    LeadingDot,
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error(
        "snapshot name has character {ch:?} at byte {pos}; only A-Z a-z 0-9 . _ - are allowed"
    )]
    BadChar {
        /// The first refused character.
        ch: char,
        /// Its byte offset in the name.
        pos: usize,
    },
}

/// Check `name` against the snapshot name rule (see the module docs).
pub fn validate_snapshot_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some((pos, ch)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar { ch, pos });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for n in [
            "a",
            "A-1",
            "snap_2026.11.28",
            "x.y-z_",
            &"n".repeat(64),
            "0",
            "a.",
        ] {
            assert_eq!(validate_snapshot_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_invalid_names() {
        assert_eq!(validate_snapshot_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_snapshot_name(&"n".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        assert_eq!(
            validate_snapshot_name(".hidden"),
            Err(NameError::LeadingDot)
        );
        assert_eq!(validate_snapshot_name(".."), Err(NameError::LeadingDot));
        assert_eq!(
            validate_snapshot_name("a/b"),
            Err(NameError::BadChar { ch: '/', pos: 1 })
        );
        assert_eq!(
            validate_snapshot_name("a b"),
            Err(NameError::BadChar { ch: ' ', pos: 1 })
        );
        assert_eq!(
            validate_snapshot_name("é"),
            Err(NameError::BadChar { ch: 'é', pos: 0 })
        );
        assert_eq!(
            validate_snapshot_name("a%2F"),
            Err(NameError::BadChar { ch: '%', pos: 1 })
        );
        assert_eq!(
            validate_snapshot_name("nul\0"),
            Err(NameError::BadChar { ch: '\0', pos: 3 })
        );
        // Multi-byte characters count in bytes for the length limit.
        assert!(matches!(
            validate_snapshot_name(&"é".repeat(40)),
            Err(NameError::TooLong { len: 80 })
        ));
    }
}
