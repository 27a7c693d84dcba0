//! The summary table of a fault test: what was injected, how much work ran through it, and how
//! many invariant checks passed.

/// One row: a fault kind in one scenario.
#[derive(Debug, Clone)]
pub struct SummaryRow {
    /// Scenario (store, component).
    pub scenario: String,
    /// The fault kind.
    pub fault: String,
    /// How many faults of this kind were injected.
    pub injected: u64,
    /// Operations that ran while faults were injected.
    pub operations: u64,
    /// Invariant checks that passed (the test fails on the first one that does not).
    pub checks: u64,
}

/// The table as Markdown (the README holds a copy of a real run).
pub fn render(rows: &[SummaryRow]) -> String {
    let mut out = String::from(
        "| scenario | fault | injected | operations | invariant checks passed |\n|---|---|---:|---:|---:|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row.scenario, row.fault, row.injected, row.operations, row.checks
        ));
    }
    out
}
