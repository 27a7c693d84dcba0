//! The schema of the embedded store: the event log (with its global position and by-time index),
//! the view rows, stats shards, checkpoints and the fencing tokens of consumers' checkpoints (a
//! table of its own, so files written before it gain it with `CREATE TABLE IF NOT EXISTS`).

pub(super) const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    occurred_at    TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    request_id     TEXT,
    correlation_id TEXT,
    payload        TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (occurred_at, event_id);
CREATE TABLE IF NOT EXISTS pool (
    sandbox_id   TEXT PRIMARY KEY,
    status       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    owner        TEXT,
    allocated_at INTEGER,
    due_at       INTEGER,
    pick         INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    row          TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_by_status_pick ON pool (status, pick);
CREATE INDEX IF NOT EXISTS pool_by_status_name ON pool (status, name, sandbox_id);
CREATE INDEX IF NOT EXISTS pool_by_owner ON pool (owner, allocated_at);
CREATE INDEX IF NOT EXISTS pool_by_status_expiry ON pool (status, due_at, sandbox_id);
CREATE TABLE IF NOT EXISTS stats (
    shard  INTEGER NOT NULL,
    status TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (shard, status)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source   TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint_fences (
    source TEXT PRIMARY KEY,
    fence  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subjects (
    subject_key TEXT PRIMARY KEY,
    pseudonym   TEXT NOT NULL UNIQUE,
    salt        TEXT NOT NULL,
    student_id  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS erased_subjects (
    pseudonym TEXT PRIMARY KEY,
    erased_at TEXT NOT NULL
);
";
