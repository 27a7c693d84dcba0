//! Which `brokerctl` command calls each operation of the API. A test compares this list with the
//! OpenAPI document the service serves: an operation without a command, or a command listed for
//! an operation that no longer exists, fails it. A new route gets its command and a row here.

/// `(method, path, command)`: the command (words after `brokerctl`) that calls the operation.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("post", "/v1/allocate", "allocate"),
    ("get", "/v1/sandboxes/{sandbox_id}", "status"),
    (
        "post",
        "/v1/sandboxes/{sandbox_id}/mark-for-deletion",
        "release",
    ),
    ("post", "/v1/sandboxes/{sandbox_id}/extend", "extend"),
    ("get", "/v1/admin/sandboxes", "list"),
    ("get", "/v1/admin/stats", "stats"),
    ("get", "/v1/admin/sandboxes/{sandbox_id}/history", "history"),
    ("get", "/v1/admin/sandboxes/{sandbox_id}", "at"),
    (
        "post",
        "/v1/admin/sandboxes/{sandbox_id}/retry-deletion",
        "retry-deletion",
    ),
    ("post", "/v1/admin/sync", "sync"),
    ("post", "/v1/admin/cleanup", "cleanup"),
    ("post", "/v1/admin/auto-expire", "auto-expire"),
    ("post", "/v1/admin/auto-delete-stale", "delete-stale"),
    ("post", "/v1/admin/bulk-delete", "bulk-delete"),
    ("get", "/v1/admin/jobs", "jobs list"),
    ("get", "/v1/admin/jobs/{job_id}", "jobs show"),
    ("get", "/v1/admin/webhooks/deliveries", "webhooks"),
    ("get", "/v1/admin/pool", "pool"),
    ("post", "/v1/admin/pool/drain", "drain"),
    ("post", "/v1/admin/pool/resume", "resume"),
    ("get", "/v1/admin/outcomes", "outcomes"),
    ("get", "/v1/admin/events", "export"),
    ("get", "/v1/admin/events/stream", "tail"),
    (
        "get",
        "/v1/admin/callers/{caller}/allocations",
        "allocations",
    ),
    ("post", "/v1/admin/students/lookup", "student"),
    ("post", "/v1/admin/students/erase", "erase"),
    ("get", "/v1/admin/pseudonyms/{pseudonym}", "pseudonym"),
    ("post", "/v1/admin/reservations", "reservations create"),
    ("get", "/v1/admin/reservations", "reservations list"),
    (
        "get",
        "/v1/admin/reservations/{reservation_id}",
        "reservations show",
    ),
    (
        "delete",
        "/v1/admin/reservations/{reservation_id}",
        "reservations cancel",
    ),
    ("get", "/v1/capacity", "capacity"),
    ("post", "/v1/sandboxes/{sandbox_id}/heartbeat", "heartbeat"),
    ("get", "/v1/admin/usage", "usage"),
    ("get", "/v1/tickets/{ticket_id}", "tickets show"),
    ("get", "/v1/admin/waiting-lines", "waiting-lines"),
];

/// `(method, path, why)`: operations that are not for people at a terminal, so no command.
pub const NOT_FOR_PEOPLE: &[(&str, &str, &str)] = &[
    (
        "get",
        "/",
        "the service root names the docs and the dashboard for a browser",
    ),
    (
        "get",
        "/healthz",
        "the liveness probe, for the load balancer and the orchestrator",
    ),
    (
        "get",
        "/readyz",
        "the readiness probe, for the load balancer and the orchestrator",
    ),
    (
        "get",
        "/metrics",
        "the Prometheus scrape, for the monitoring system",
    ),
];
