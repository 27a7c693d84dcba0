//! The pool broken down by name prefix: which group a sandbox counts in, and the low-water
//! thresholds operators set per group (ADR 0018).
//!
//! The group of a sandbox is a pure function of its name, so every projector source, a rebuild
//! and a verify put a sandbox in the same group whatever the configuration says.

use std::collections::BTreeMap;
use std::str::FromStr;

use thiserror::Error;

use super::lifecycle::SandboxStatus;
use super::projection::PoolStats;

/// The group of sandboxes whose names have no `-` at all.
pub const UNGROUPED: &str = "";

/// Counts by status per name prefix (the sum of the prefix counters).
pub type PrefixStats = BTreeMap<String, PoolStats>;

/// The group a sandbox name counts in: the name without its last `-`-separated segment
/// (`aws-lab-007` → `aws-lab`, `lab-7` → `lab`), trailing dashes dropped; a name without `-` is
/// in [`UNGROUPED`]. Names are `<prefix>-<serial>` in every pool seen so far, and the prefix
/// tracks send as `X-Sandbox-Name-Prefix` is that part (or a shorter start of it).
pub fn pool_prefix(name: &str) -> &str {
    match name.rfind('-') {
        Some(i) => name[..i].trim_end_matches('-'),
        None => UNGROUPED,
    }
}

/// Why a `POOL_LOW_WATER` value was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LowWaterError {
    /// An entry is not `prefix=count`.
    #[error("`{0}` is not prefix=count")]
    Entry(String),
    /// A count is not a non-negative integer.
    #[error("`{0}`: the count must be a non-negative integer")]
    Count(String),
    /// A prefix appears twice.
    #[error("prefix `{0}` appears twice")]
    Duplicate(String),
}

/// Low-water thresholds: a prefix group is low when its `available` count drops below its
/// threshold. Parsed from `prefix=count,…`; the key `default` sets the threshold of every group
/// not listed (none: unlisted groups are never low).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LowWater {
    /// Thresholds of named groups.
    pub by_prefix: BTreeMap<String, i64>,
    /// Threshold of every other group.
    pub default: Option<i64>,
}

/// One group below its threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowGroup {
    /// The name prefix group.
    pub prefix: String,
    /// Its available sandboxes.
    pub available: i64,
    /// Its threshold.
    pub threshold: i64,
}

impl LowWater {
    /// The threshold of a group, if any.
    pub fn threshold(&self, prefix: &str) -> Option<i64> {
        self.by_prefix.get(prefix).copied().or(self.default)
    }

    /// True when no threshold is configured.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty() && self.default.is_none()
    }

    /// Every group below its threshold. A named group with no sandboxes at all counts as empty
    /// (a pool that ran completely dry is the case that matters most); `default` applies only
    /// to groups that exist.
    pub fn low_groups(&self, stats: &PrefixStats) -> Vec<LowGroup> {
        let available = |prefix: &str| {
            stats
                .get(prefix)
                .map_or(0, |s| s.get(SandboxStatus::Available))
        };
        let mut prefixes: Vec<&str> = self.by_prefix.keys().map(String::as_str).collect();
        if self.default.is_some() {
            prefixes.extend(stats.keys().map(String::as_str));
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        prefixes
            .into_iter()
            .filter_map(|prefix| {
                let threshold = self.threshold(prefix)?;
                let available = available(prefix);
                (available < threshold).then(|| LowGroup {
                    prefix: prefix.to_string(),
                    available,
                    threshold,
                })
            })
            .collect()
    }
}

impl FromStr for LowWater {
    type Err = LowWaterError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut low = LowWater::default();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (prefix, count) = entry
                .rsplit_once('=')
                .ok_or_else(|| LowWaterError::Entry(entry.to_string()))?;
            let count: i64 = count
                .trim()
                .parse()
                .ok()
                .filter(|c| *c >= 0)
                .ok_or_else(|| LowWaterError::Count(entry.to_string()))?;
            let prefix = prefix.trim();
            if prefix == "default" {
                if low.default.replace(count).is_some() {
                    return Err(LowWaterError::Duplicate(prefix.to_string()));
                }
            } else if low.by_prefix.insert(prefix.to_string(), count).is_some() {
                return Err(LowWaterError::Duplicate(prefix.to_string()));
            }
        }
        Ok(low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group is the name without its last segment; dashless names are ungrouped.
    #[test]
    fn groups_by_name_without_serial() {
        assert_eq!(pool_prefix("aws-lab-007"), "aws-lab");
        assert_eq!(pool_prefix("lab-7"), "lab");
        assert_eq!(pool_prefix("lab--7"), "lab");
        assert_eq!(pool_prefix("solo"), UNGROUPED);
    }

    /// Thresholds parse with a default; bad entries are refused with the entry named.
    #[test]
    fn parses_thresholds() {
        let low: LowWater = "lab=10, aws-lab=5,default=2".parse().unwrap_or_default();
        assert_eq!(low.threshold("lab"), Some(10));
        assert_eq!(low.threshold("other"), Some(2));
        assert_eq!(
            "lab".parse::<LowWater>(),
            Err(LowWaterError::Entry("lab".into()))
        );
        assert_eq!(
            "lab=-1".parse::<LowWater>(),
            Err(LowWaterError::Count("lab=-1".into()))
        );
        assert_eq!(
            "lab=1,lab=2".parse::<LowWater>(),
            Err(LowWaterError::Duplicate("lab".into()))
        );
        assert!("".parse::<LowWater>().is_ok_and(|l| l.is_empty()));
    }

    /// A named group with no sandboxes is low; the default covers only existing groups.
    #[test]
    fn finds_low_groups() {
        let low: LowWater = "lab=3,gone=1,default=1".parse().unwrap_or_default();
        let mut stats = PrefixStats::new();
        let mut lab = PoolStats::default();
        lab.by_status[SandboxStatus::Available.index()] = 2;
        stats.insert("lab".into(), lab);
        stats.insert("x".into(), PoolStats::default());
        let groups: Vec<(String, i64, i64)> = low
            .low_groups(&stats)
            .into_iter()
            .map(|g| (g.prefix, g.available, g.threshold))
            .collect();
        assert_eq!(
            groups,
            [
                ("gone".to_string(), 0, 1),
                ("lab".to_string(), 2, 3),
                ("x".to_string(), 0, 1)
            ]
        );
    }
}
