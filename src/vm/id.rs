//! VM identifiers: validation of caller-chosen ids and generation of new ones.

use std::fmt;

/// Longest vm_id accepted: a Docker name component and a label value both stay well inside
/// their limits, and `unkey-vm-<scope>-<id>` stays readable.
pub const MAX_LEN: usize = 63;

/// A validated VM id: 1–63 chars of `[a-z0-9_.-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(String);

impl VmId {
    /// Validates a caller-supplied id.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > MAX_LEN {
            return Err(format!(
                "must be at most {MAX_LEN} characters, got {}",
                raw.len()
            ));
        }
        let first = raw.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err("must start with a lowercase letter or a digit".into());
        }
        if let Some(bad) = raw.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
        }) {
            return Err(format!(
                "contains {bad:?}; allowed are a-z, 0-9, '_', '.', '-'"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A new id: `vm-` and a ULID in lowercase — time-sortable, 80 random bits from the
    /// thread's CSPRNG (unguessable), and only `[0-9a-z]`, so safe in URLs, names and labels.
    pub fn generate() -> Self {
        Self(format!(
            "vm-{}",
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in ["a", "vm-1", "0abc", "my.vm_2-x", &"a".repeat(63)] {
            assert!(VmId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "vm/1",
            "vm 1",
            "vm:1",
            &"a".repeat(64),
            "é",
        ] {
            assert!(VmId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_ids_are_valid_unique_and_sortable() {
        let a = VmId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = VmId::generate();
        assert!(VmId::parse(a.as_str()).is_ok());
        assert_ne!(a, b);
        assert!(a < b, "{a} < {b}");
        assert_eq!(a.as_str().len(), 29);
    }
}
