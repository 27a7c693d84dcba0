//! brokerctl's integration tests, one binary with a module per area (a binary per file would link
//! the harness and the service once per file). Tests are named `module::test`.

mod brokerctl;
mod event_contract;
mod grafana_dashboard;
mod instruqt;
mod verbs;
