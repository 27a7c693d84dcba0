//! Secrets in settings: a type that cannot be printed, read from a variable or a file (never from
//! the command line: see [`crate::settings`]), and the strength every configured token must have.
//!
//! # The strength estimate
//! A secret's strength is estimated as `length × log2(alphabet)`, where `length` counts its
//! characters and `alphabet` adds up the sizes of the character classes it uses: lowercase
//! letters (26), uppercase letters (26), digits (10), and anything else (33, the printable ASCII
//! symbols and space). `openssl rand -hex 32` scores 64 × log2(36) ≈ 331 bits (its 64 characters
//! use the lowercase and digit classes), `openssl rand -base64 32` more. The estimate is an upper
//! bound: it refuses a short or small-alphabet value (`password123`, a 20-digit number), but
//! it cannot tell a generated value from a repeated or predictable one of the same shape, so
//! secrets must still be generated, not made up.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The weakest secret accepted, in bits of [`estimated_bits`].
pub const MIN_SECRET_BITS: f64 = 128.0;

/// A setting that must never reach a log line, an error or a response: `Debug` and `Display`
/// print `<redacted>`; [`Secret::expose`] is the one way to the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret text, for the one place that compares or uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// The strength estimate of `text` in bits (see the module docs).
pub fn estimated_bits(text: &str) -> f64 {
    let (mut lower, mut upper, mut digit, mut other) = (false, false, false, false);
    let mut length = 0usize;
    for c in text.chars() {
        length += 1;
        match c {
            'a'..='z' => lower = true,
            'A'..='Z' => upper = true,
            '0'..='9' => digit = true,
            _ => other = true,
        }
    }
    let alphabet = [(lower, 26), (upper, 26), (digit, 10), (other, 33)]
        .iter()
        .filter(|(used, _)| *used)
        .map(|(_, size)| size)
        .sum::<u32>();
    if alphabet == 0 {
        return 0.0;
    }
    length as f64 * f64::from(alphabet).log2()
}

/// Refuses a secret weaker than [`MIN_SECRET_BITS`]. The error names the setting, never the
/// value (nor its length, which would tell a guesser where to start).
pub fn check_strength(setting: &str, secret: &Secret) -> Result<(), String> {
    if estimated_bits(secret.expose().trim()) < MIN_SECRET_BITS {
        return Err(format!(
            "{setting} is too weak: at least {MIN_SECRET_BITS} bits are required (estimated from its length and character classes); generate one, e.g. `openssl rand -base64 32`"
        ));
    }
    Ok(())
}

/// A secret given either as the variable `name` (`value`) or in the file `{name}_FILE` (`file`,
/// trailing whitespace dropped), not both; neither: `None`.
pub fn from_value_or_file(
    name: &str,
    value: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("set {name} or {name}_FILE, not both")),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(Secret::from(text.trim_end().to_string())))
            // The io error names the problem (missing, permissions), never the contents.
            .map_err(|e| format!("cannot read {name}_FILE {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither `Debug` nor `Display` shows the text.
    #[test]
    fn a_secret_does_not_print() {
        let secret = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(<redacted>)");
        assert_eq!(secret.expose(), "hunter2-hunter2");
    }

    /// The estimate is length × log2(alphabet of the classes used); 128 bits is the line.
    #[test]
    fn strength_is_length_times_class_alphabet() {
        assert_eq!(estimated_bits(""), 0.0);
        assert!((estimated_bits("abcd") - 4.0 * 26f64.log2()).abs() < 1e-9);
        assert!((estimated_bits("aB3!") - 4.0 * 95f64.log2()).abs() < 1e-9);
        // 32 hex characters (lowercase + digits: 36) pass; 27 lowercase letters do not.
        assert!(check_strength("T", &Secret::from("0123456789abcdef0123456789abcdef")).is_ok());
        assert!(check_strength("T", &Secret::from("a".repeat(27).as_str())).is_err());
        // 38 digits ≈ 126 bits: refused, though long.
        let digits = Secret::from("1".repeat(38).as_str());
        let refused = check_strength("SOME_TOKEN", &digits)
            .err()
            .unwrap_or_default();
        assert!(refused.contains("SOME_TOKEN"), "{refused}");
        assert!(!refused.contains("1111"), "{refused}");
    }

    /// A secret comes from its variable or its file, never both; the file's newline is dropped.
    #[test]
    fn value_or_file() -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("token");
        std::fs::write(&path, "from-file\n").map_err(|e| e.to_string())?;
        let value = Secret::from("from-var");
        assert_eq!(
            from_value_or_file("X", None, Some(&path))?.map(|s| s.expose().to_string()),
            Some("from-file".to_string())
        );
        assert_eq!(
            from_value_or_file("X", Some(&value), None)?,
            Some(value.clone())
        );
        assert!(from_value_or_file("X", Some(&value), Some(&path)).is_err());
        assert_eq!(from_value_or_file("X", None, None)?, None);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
