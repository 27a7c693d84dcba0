//! The OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail, FieldProblem};
use crate::routes::{
    admin, admin_jobs, ops, outcomes, pool, reservations, sandboxes, students, tickets,
    waiting_lines, webhooks,
};

/// The API description served at `{API_BASE_PATH}/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Sandbox Broker API", description = "Hands pre-created CSP sandbox accounts to lab students. Event-sourced, on one of two stores: an embedded SQLite file (the default, for one process) or DynamoDB (for AWS)."),
    paths(
        sandboxes::allocate_sandbox, sandboxes::get_sandbox, sandboxes::mark_for_deletion,
        sandboxes::extend_lease,
        admin::list_sandboxes, admin::get_stats, admin::get_history, admin::retry_deletion,
        admin::run_sync, admin::run_cleanup, admin::run_auto_expire, admin::run_delete_stale,
        admin::bulk_delete, admin_jobs::list_jobs, admin_jobs::get_job,
        webhooks::get_deliveries,
        pool::get_pool_control, pool::drain_pool, pool::resume_pool, outcomes::get_outcomes,
        ops::service_root, ops::healthz, ops::readyz, ops::metrics,
        students::lookup_student, students::erase_student, students::get_pseudonym,
        reservations::create_reservation, reservations::list_reservations,
        reservations::get_reservation, reservations::cancel_reservation,
        reservations::get_capacity,
        tickets::get_ticket, waiting_lines::list_waiting_lines,
    ),
    components(schemas(ErrorBody, ErrorDetail, FieldProblem,
        sandboxes::AllocateResponse, sandboxes::SandboxResponse, sandboxes::MarkResponse,
        admin::AdminSandbox, admin::ListResponse, admin::StatsResponse, admin::PrefixCounts, admin::LowWaterGroup, admin::HistoryResponse,
        admin::RetryDeletionResponse, admin_jobs::AdminJob, admin_jobs::JobAccepted,
        admin_jobs::JobList, webhooks::DeliveriesResponse, webhooks::SubscriberDeliveries,
        sandboxes::ExtendRequest, sandboxes::ExtendResponse,
        pool::PoolControlResponse, pool::DrainView, pool::QuotaView,
        students::StudentRequest, students::StudentResponse, students::PseudonymResponse,
        students::ErasureResponse,
        reservations::CreateReservationRequest, reservations::ReservationView,
        reservations::ReservationCreated, reservations::ReservationList,
        reservations::CapacityNumbers, reservations::CapacityAnswer,
        reservations::PrefixForecast,
        tickets::TicketResponse, waiting_lines::WaitingLinesResponse,
        waiting_lines::WaitingLineView)),
    modifiers(&BearerAuth, &EdgeResponses),
    tags(
        (name = "Sandboxes", description = "Track scripts (track token)"),
        (name = "Admin", description = "Operators (admin token)"),
        (name = "Observability", description = "Probes and metrics (no auth)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Documents the error responses the outer layers can give on every operation, whatever its
/// handler does: 408 (request timeout), 413 (body over the limit), 414 (request line over the
/// limit), 431 (headers over the limit),
/// 500 (panic guard) and, except
/// on the probes and the scrape that rate limit and load shedding exempt, 429 and 503. Each is the [`ErrorBody`] envelope;
/// a status an operation already documents is left as it is. Other `OpenApi` documents merged
/// into [`ApiDoc`] apply it too (`modifiers(&EdgeResponses)`): modifiers run before a merge.
pub struct EdgeResponses;

impl EdgeResponses {
    const ALWAYS: [(&'static str, &'static str); 5] = [
        ("408", "Request timed out"),
        ("413", "Request body too large"),
        (
            "414",
            "`URI_TOO_LONG`: a request line (method, path and query) over 64 KiB",
        ),
        (
            "431",
            "`HEADERS_TOO_LARGE`: more than 64 KiB of headers, or more than 100 of them",
        ),
        (
            "500",
            "Unexpected error (the cause is logged with the request id)",
        ),
    ];
    const RATE_LIMITED: (&'static str, &'static str) = ("429", "Rate limited");
    const OVERLOADED: (&'static str, &'static str) = (
        "503",
        "`OVERLOADED`: too many requests in progress, shed before any work",
    );

    fn add(operation: &mut Operation, status: &str, description: &str) {
        let responses = &mut operation.responses.responses;
        if !responses.contains_key(status) {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", content)
                .build();
            responses.insert(status.to_string(), response.into());
        }
    }
}

impl Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let rate_limited = !crate::edge::EXEMPT.contains(&path.as_str());
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in Self::ALWAYS {
                    Self::add(operation, status, description);
                }
                if rate_limited {
                    for (status, description) in [Self::RATE_LIMITED, Self::OVERLOADED] {
                        Self::add(operation, status, description);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation documents the edge's error statuses; the probes are not rate limited.
    #[test]
    fn every_operation_documents_the_edge_errors() {
        let doc = ApiDoc::openapi();
        assert!(!doc.paths.paths.is_empty());
        for (path, item) in &doc.paths.paths {
            for operation in [&item.get, &item.post].into_iter().flatten() {
                let documented = |s: &str| operation.responses.responses.contains_key(s);
                for status in ["408", "413", "414", "431", "500"] {
                    assert!(documented(status), "{path}: {status} undocumented");
                }
                let exempt = crate::edge::EXEMPT.contains(&path.as_str());
                assert_eq!(documented("429"), !exempt, "{path}: 429");
                if !exempt {
                    assert!(documented("503"), "{path}: 503 undocumented");
                }
            }
        }
    }

    /// The audit feed's `type` filter accepts exactly the domain's event types.
    #[test]
    fn event_type_filter_lists_every_event_type() {
        let doc = serde_json::to_value(
            ApiDoc::openapi().merge_from(crate::routes::events::EventsApi::openapi()),
        )
        .unwrap_or_default();
        let params = doc["paths"]["/v1/admin/events"]["get"]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let pattern = params
            .iter()
            .find(|p| p["name"] == "type")
            .map(|p| p["schema"]["pattern"].clone())
            .unwrap_or_default();
        let expected = format!("^({})$", domain::model::events::EVENT_TYPES.join("|"));
        assert_eq!(pattern, serde_json::Value::String(expected), "{params:?}");
    }

    /// Every parameter of the served document (the merged one).
    fn all_parameters() -> Vec<(String, String, serde_json::Value)> {
        let doc = serde_json::to_value(
            ApiDoc::openapi().merge_from(crate::routes::events::EventsApi::openapi()),
        )
        .unwrap_or_default();
        let mut all = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, operation) in item.as_object().into_iter().flatten() {
                for param in operation["parameters"].as_array().into_iter().flatten() {
                    all.push((method.clone(), path.clone(), param.clone()));
                }
            }
        }
        all
    }

    /// Each id rule in the document is one of the two the server applies (`validate_id`,
    /// `validate_optional_id`), spelled exactly as the domain defines it, with the byte limit in
    /// the schema's `maxLength` and its description; and each listing's `cursor` states that
    /// listing's own pattern and length (`routes::cursor`).
    #[test]
    fn id_and_cursor_parameters_state_the_rules_the_server_applies() {
        use crate::routes::cursor::{Listing, MAX_CURSOR_CHARS};
        use domain::model::ids::{ID_PATTERN, MAX_ID_BYTES, OPTIONAL_ID_PATTERN};
        let mut ids = 0;
        let mut cursors = Vec::new();
        for (method, path, param) in all_parameters() {
            let schema = &param["schema"];
            let pattern = schema["pattern"].as_str().unwrap_or_default();
            if param["name"] == "cursor" {
                cursors.push((path.clone(), pattern.to_string()));
                assert_eq!(schema["maxLength"], MAX_CURSOR_CHARS, "{method} {path}");
                continue;
            }
            if !pattern.contains(r"\x7f-\x9f") {
                continue;
            }
            ids += 1;
            assert!(
                pattern == ID_PATTERN || pattern == OPTIONAL_ID_PATTERN,
                "{method} {path} {}: {pattern}",
                param["name"]
            );
            assert_eq!(schema["maxLength"], MAX_ID_BYTES, "{method} {path} {param}");
            let text = param["description"].as_str().unwrap_or_default();
            assert!(text.contains("256 bytes"), "{method} {path} {param}");
        }
        assert!(ids >= 20, "only {ids} id parameters found");
        cursors.sort();
        let expected = [
            (
                "/v1/admin/callers/{caller}/allocations",
                Listing::Allocations,
            ),
            ("/v1/admin/events", Listing::Events),
            ("/v1/admin/sandboxes", Listing::Sandboxes),
        ]
        .map(|(path, listing)| (path.to_string(), listing.pattern().to_string()));
        assert_eq!(cursors, expected.to_vec());
    }

    /// The track operations state the id constraints the server enforces (length, no control
    /// characters), so schema-valid requests are not rejected as malformed.
    #[test]
    fn track_ids_state_their_constraints() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        let params = &doc["paths"]["/v1/sandboxes/{sandbox_id}"]["get"]["parameters"];
        let id = params
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "sandbox_id"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(id["schema"]["maxLength"], 256, "{id}");
        assert!(id["schema"]["pattern"].is_string(), "{id}");
    }
}
