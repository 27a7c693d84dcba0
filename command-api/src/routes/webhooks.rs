//! Webhook delivery state for operators (ADR 0018).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;
use crate::webhooks::DeliveryState;

/// One subscriber and how its deliveries stand (the secret is never shown).
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriberDeliveries {
    /// The subscriber's name.
    pub name: String,
    /// Where notifications go: scheme, host and port only. The path and query, which often
    /// hold the receiver's credential, are never shown.
    pub target: String,
    /// Name prefixes it hears about (empty: all).
    pub prefixes: Vec<String>,
    /// Kinds it hears about (empty: all).
    pub kinds: Vec<String>,
    /// Its saved delivery state: feed position, counts, the notification being retried, the
    /// last ones given up; `null` before its first pass.
    #[schema(value_type = Option<Object>)]
    pub state: Option<DeliveryState>,
}

/// Every subscriber's delivery state.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveriesResponse {
    /// One entry per configured subscriber.
    pub subscribers: Vec<SubscriberDeliveries>,
}

/// The webhook routes (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new().route("/admin/webhooks/deliveries", get(get_deliveries))
}

/// How each webhook subscriber's deliveries stand.
#[utoipa::path(
    get, path = "/v1/admin/webhooks/deliveries", tag = "Admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "Delivery state per subscriber", body = DeliveriesResponse),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_deliveries(
    State(state): State<SharedState>,
) -> Result<Json<DeliveriesResponse>, ApiError> {
    let Some(dispatcher) = &state.webhooks else {
        return Ok(Json(DeliveriesResponse {
            subscribers: Vec::new(),
        }));
    };
    let subscribers = dispatcher
        .states()
        .await?
        .into_iter()
        .map(|(s, state)| SubscriberDeliveries {
            name: s.name.clone(),
            target: s.target(),
            prefixes: s.prefixes.clone(),
            kinds: s.kinds.iter().map(|k| k.as_str().to_string()).collect(),
            state,
        })
        .collect();
    Ok(Json(DeliveriesResponse { subscribers }))
}
