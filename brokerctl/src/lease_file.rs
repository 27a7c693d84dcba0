//! The lab's lease file (`--lease-file`, `BROKER_LEASE_FILE`): the allocation's idempotency key
//! and lease token, readable only by the lab user (mode 0600). Where the broker applies the lease
//! capability (docs/tenancy.md) these two values are what proves the allocation: the key replays
//! it after a lost answer, the token opens its per-sandbox calls. A caller id proves nothing.
//!
//! Format: `idempotency_key=<key>`, `lease_token=<token>` and `sandbox_id=<id>` lines, the same
//! file the curl-only Instruqt scripts read and write.

use std::io::Write;
use std::path::Path;

use crate::failure::Failure;

/// What a lease file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The `Idempotency-Key` the allocation was (or will be) requested with.
    pub idempotency_key: Option<String>,
    /// The allocation's `lease_token` (after a 200/201).
    pub lease_token: Option<String>,
    /// The sandbox it holds (after a 200/201).
    pub sandbox_id: Option<String>,
}

/// A fresh 128-bit idempotency key, hex (32 characters, what the broker requires).
pub fn new_key() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Reads the file; a missing file is an empty state.
pub fn load(path: &Path) -> Result<LeaseState, Failure> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LeaseState::default()),
        Err(e) => return Err(Failure::Unexpected(format!("{}: {e}", path.display()))),
    };
    let mut state = LeaseState::default();
    for line in text.lines() {
        let value = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
        if let Some(v) = line.strip_prefix("idempotency_key=") {
            state.idempotency_key = value(v);
        } else if let Some(v) = line.strip_prefix("lease_token=") {
            state.lease_token = value(v);
        } else if let Some(v) = line.strip_prefix("sandbox_id=") {
            state.sandbox_id = value(v);
        }
    }
    Ok(state)
}

/// Writes the file atomically, created with mode 0600 (the lab user only).
pub fn save(path: &Path, state: &LeaseState) -> Result<(), Failure> {
    let mut text = String::new();
    for (name, value) in [
        ("idempotency_key", &state.idempotency_key),
        ("lease_token", &state.lease_token),
        ("sandbox_id", &state.sandbox_id),
    ] {
        if let Some(value) = value {
            text.push_str(&format!("{name}={value}\n"));
        }
    }
    let fail = |e: std::io::Error| Failure::Unexpected(format!("{}: {e}", path.display()));
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = std::path::PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp).map_err(fail)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&temp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file round-trips, is private to its owner, and a missing file is an empty state.
    #[test]
    fn lease_file_round_trips_privately() {
        let dir = std::env::temp_dir().join(format!("lease-file-{}", new_key()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("lease");
        assert_eq!(load(&path).ok(), Some(LeaseState::default()));
        let state = LeaseState {
            idempotency_key: Some(new_key()),
            lease_token: Some("lt1.k1.abc".into()),
            sandbox_id: Some("sb-1".into()),
        };
        save(&path, &state).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(&path).ok(), Some(state));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            assert_eq!(mode, 0o600);
        }
        assert_eq!(new_key().len(), 32);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
