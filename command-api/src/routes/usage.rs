//! `GET /admin/usage`: who used how much of the pool over a range, by track, prefix or day,
//! as JSON or CSV (ADR 0030). The figures come from the event log through
//! [`domain::usage::usage_from_feed`], the same computation `broker-audit usage` runs offline.
//! `track=` and `prefix=` narrow the report to one track's allocations or to sandboxes whose name
//! starts with a prefix (ADR 0034).

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use domain::usage::{
    parse_usage_time, usage_csv, usage_from_feed_filtered, UsageFilter, UsageGroupBy, UsageQuery,
    UsageReport,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::openapi::EdgeResponses;
use crate::state::SharedState;

/// The range a request without `from` covers: the last seven days.
const DEFAULT_RANGE_DAYS: i64 = 7;

/// The figures of one group, or of the whole range.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageGroup {
    /// The group: a track, a name prefix or a `YYYY-MM-DD` day; `total` in the totals.
    pub group: String,
    /// Allocations that started in the range.
    pub allocations: u64,
    /// Hours those allocations held their sandboxes (up to the range's end for those still held).
    pub sandbox_hours: f64,
    /// Allocations that ended in the range.
    pub ended: u64,
    /// Allocations still held at the end of the range.
    pub held_at_end: u64,
    /// Median hold time of the ended allocations, seconds (nearest rank); `null` without any.
    pub hold_median_s: Option<u64>,
    /// 95th-percentile hold time of the ended allocations, seconds (nearest rank).
    pub hold_p95_s: Option<u64>,
    /// Lease extensions.
    pub extensions: u64,
    /// Allocations that waited in line before they were served.
    pub waits: u64,
    /// Allocations ended by the heartbeat reclaim.
    pub reclaims: u64,
    /// Refused allocation requests by error code (from the refusal summaries).
    pub refusals: BTreeMap<String, u64>,
    /// Sandboxes deleted at the CSP.
    pub deletions: u64,
    /// Sandboxes quarantined after their deletion failed for good.
    pub quarantines: u64,
}

/// A usage report.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    /// Inclusive start (RFC 3339).
    pub from: String,
    /// Exclusive end (RFC 3339).
    pub to: String,
    /// `track`, `prefix` or `day`.
    pub group_by: String,
    /// The `track` filter, when the request had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track: Option<String>,
    /// The `prefix` filter (sandbox names starting with it), when the request had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// One entry per group, in key order.
    pub groups: Vec<UsageGroup>,
    /// The whole range.
    pub totals: UsageGroup,
    /// Events read.
    pub events_read: u64,
    /// True when more groups appeared than one report keeps apart; the rest are in `(other)`.
    pub groups_folded: bool,
    /// Refusal summaries read (0: refusals were not recorded in this range).
    pub refusal_summaries: u64,
    /// What the refusal figures cover.
    pub refusals_note: String,
}

fn group_of(f: domain::usage::UsageFigures) -> UsageGroup {
    UsageGroup {
        group: f.group,
        allocations: f.allocations,
        sandbox_hours: f.sandbox_hours,
        ended: f.ended,
        held_at_end: f.held_at_end,
        hold_median_s: f.hold_median_s,
        hold_p95_s: f.hold_p95_s,
        extensions: f.extensions,
        waits: f.waits,
        reclaims: f.reclaims,
        refusals: f.refusals,
        deletions: f.deletions,
        quarantines: f.quarantines,
    }
}

impl From<UsageReport> for UsageResponse {
    fn from(r: UsageReport) -> Self {
        Self {
            from: r.from,
            to: r.to,
            group_by: r.group_by.as_str().to_string(),
            track: r.track,
            prefix: r.prefix,
            groups: r.groups.into_iter().map(group_of).collect(),
            totals: group_of(r.totals),
            events_read: r.events_read,
            groups_folded: r.groups_folded,
            refusal_summaries: r.refusal_summaries,
            refusals_note: r.refusals_note,
        }
    }
}

/// The usage route (the admin auth layer is applied by the caller).
pub fn router() -> Router<SharedState> {
    Router::new().route("/admin/usage", get(get_usage))
}

/// The OpenAPI description of the usage route (merged into the API's document).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(get_usage),
    components(schemas(UsageResponse, UsageGroup)),
    modifiers(&EdgeResponses)
)]
pub struct UsageApi;

fn time_param(raw: Option<&String>, field: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|v| {
        parse_usage_time(v).map_err(|problem| ApiError::validation("query", field, problem))
    })
    .transpose()
}

/// An optional id filter (`track`, `prefix`): not blank, no control characters, at most
/// 256 bytes, as every id the API takes.
fn id_param(raw: Option<&String>, field: &'static str) -> Result<Option<String>, ApiError> {
    raw.map(|v| {
        domain::model::ids::validate_id(field, v).map_err(|e| {
            ApiError::validation(
                "query",
                field,
                format!("{e}; send a {field} name, or leave {field} out for every {field}"),
            )
        })
    })
    .transpose()
}

/// True when the client asked for CSV (`format=csv`, or `text/csv` in `Accept`).
fn wants_csv(q: &HashMap<String, String>, headers: &HeaderMap) -> Result<bool, ApiError> {
    match q.get("format").map(|f| f.trim()) {
        Some("csv") => return Ok(true),
        Some("json") => return Ok(false),
        Some(_) => {
            return Err(ApiError::validation(
                "query",
                "format",
                "must be json or csv (or leave it out and send Accept: text/csv)",
            ))
        }
        None => {}
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv")))
}

/// Usage over a range: allocations, sandbox-hours, hold times, extensions, waits, refusals,
/// deletions and quarantines, by track, prefix or day.
#[utoipa::path(
    get, path = "/v1/admin/usage", tag = "Admin", security(("bearer" = [])),
    params(
        ("from" = Option<String>, Query, format = DateTime, example = "2026-03-02T00:00:00Z", description = "Inclusive start: RFC 3339 (a day, `YYYY-MM-DD`, is accepted too: its midnight UTC); default: 7 days before `to`"),
        ("to" = Option<String>, Query, format = DateTime, example = "2026-03-03T00:00:00Z", description = "Exclusive end: RFC 3339 (or a day); default: now (plus 5 minutes for writers' clock skew). Must be after `from`, at most 400 days later (else 400 `VALIDATION_ERROR`)"),
        ("group_by" = Option<String>, Query, example = "track", pattern = "^(track|prefix|day)$", description = "`track` (default), `prefix` or `day`"),
        ("format" = Option<String>, Query, example = "csv", pattern = "^(json|csv)$", description = "`csv` for CSV (as `Accept: text/csv` does); default JSON"),
        ("track" = Option<String>, Query, example = "aws-lab", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only allocations made for this track (with any `group_by`); an unknown track gives an empty report. Not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("prefix" = Option<String>, Query, example = "aws-lab-", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only allocations of sandboxes whose name starts with this (with any `group_by`). Not blank, no control characters, at most 256 bytes (UTF-8)"),
    ),
    responses(
        (status = 200, description = "The report (JSON, or CSV with a header line, a line per group and a `total` line)", content((UsageResponse = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Bad parameter: a time that does not parse, an empty or reversed range, a range over 400 days, an unknown grouping, a blank or malformed `track` or `prefix`", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_usage(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(unknown) = q
        .keys()
        .find(|k| !["from", "to", "group_by", "format", "track", "prefix"].contains(&k.as_str()))
    {
        return Err(ApiError::validation(
            "query",
            unknown,
            "unknown parameter; use from, to, group_by, format, track or prefix",
        ));
    }
    let filter = UsageFilter {
        track: id_param(q.get("track"), "track")?,
        name_prefix: id_param(q.get("prefix"), "prefix")?,
    };
    let csv = wants_csv(&q, &headers)?;
    let now = state.broker.clock().now();
    // Without `to`, everything recorded so far: the audit feed's slack for writers' clocks
    // (allocations still held count up to now, not to this bound).
    let to = time_param(q.get("to"), "to")?
        .unwrap_or(now + Duration::seconds(domain::audit::FUTURE_SLACK_S));
    let from =
        time_param(q.get("from"), "from")?.unwrap_or(to - Duration::days(DEFAULT_RANGE_DAYS));
    let group_by = match q.get("group_by") {
        None => UsageGroupBy::Track,
        Some(raw) => raw
            .parse::<UsageGroupBy>()
            .map_err(|e| ApiError::validation("query", "group_by", e.to_string()))?,
    };
    let query = UsageQuery::new(from, to, group_by)
        .map_err(|e| ApiError::validation("query", "to", e.to_string()))?;
    let report = usage_from_feed_filtered(
        state.feed.feed().as_ref(),
        state.broker.events().as_ref(),
        query,
        filter,
        now,
    )
    .await?;
    if csv {
        let mut response = usage_csv(&report).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(response);
    }
    Ok(Json(UsageResponse::from(report)).into_response())
}
