//! The operator dashboard at `/dashboard`: one HTML page, one script and one stylesheet, embedded
//! in the binary (nothing is fetched from elsewhere, at build or run time). The page itself needs
//! no token; the operator types the admin token into it, the script keeps it in `sessionStorage`
//! and sends it as a bearer header to the admin API (the live stream is read with `fetch`, not
//! `EventSource`, precisely so that the token travels in the header and never in a URL).
//!
//! Before login the page says where the admin token comes from: the start-up banner when the
//! service runs with its built-in development tokens (only possible on a loopback address), the
//! `BROKER_ADMIN_TOKEN` setting otherwise. The token itself is never written into the page.
//!
//! The edge's content-security policy for `/dashboard` allows only these same-origin files: no
//! inline script, so the page's only script is `app.js`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::state::SharedState;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// The dashboard routes (no auth: the page asks for the admin token).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/dashboard", get(dashboard_page))
        .route(
            "/dashboard/",
            get(|| async { Redirect::permanent("/dashboard") }),
        )
        .route("/dashboard/app.js", get(dashboard_script))
        .route("/dashboard/style.css", get(dashboard_style))
}

/// Escapes text for an HTML attribute value.
fn escape_attribute(raw: &str) -> String {
    raw.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn asset(content_type: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Where the admin token comes from, for the page's login hint (HTML text, no token in it).
fn token_hint(dev_tokens: bool) -> &'static str {
    if dev_tokens {
        "this service runs with its built-in development tokens, so it printed the admin token in \
         its start-up banner, in the terminal where it was started: the line \
         <code>admin: dev-admin-token-…</code>. Set <code>BROKER_ADMIN_TOKEN</code> (and \
         <code>BROKER_API_TOKEN</code>) for anything real."
    } else {
        "it is the value of the service's <code>BROKER_ADMIN_TOKEN</code> setting. Deployed with \
         the repository's Terraform, it is the Secrets Manager secret \
         <code>&lt;name_prefix&gt;/broker-admin-token</code>: <code>aws secretsmanager \
         get-secret-value --secret-id &lt;name_prefix&gt;/broker-admin-token --query SecretString \
         --output text</code>."
    }
}

/// The page; the API's base path is written into a `<meta>` tag for the script, and the login
/// hint says where this service's admin token comes from.
pub async fn dashboard_page(State(state): State<SharedState>) -> Response {
    let dev_tokens = state.admin_token.current() == crate::config::DEV_ADMIN_TOKEN;
    let page = INDEX_HTML
        .replace("{{API_BASE}}", &escape_attribute(&state.base_path))
        .replace("{{DEV_TOKENS}}", if dev_tokens { "true" } else { "false" })
        .replace("{{TOKEN_HINT}}", token_hint(dev_tokens));
    asset("text/html; charset=utf-8", page)
}

/// The page's script.
pub async fn dashboard_script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS.to_string())
}

/// The page's stylesheet.
pub async fn dashboard_style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base path cannot break out of the attribute; the page loads its script as a file.
    #[test]
    fn base_path_is_escaped_and_script_is_external() {
        assert_eq!(escape_attribute("/v1\"><x>"), "/v1&quot;&gt;&lt;x&gt;");
        assert!(INDEX_HTML.contains("{{API_BASE}}"));
        assert!(INDEX_HTML.contains("src=\"/dashboard/app.js\""));
        assert!(!INDEX_HTML.contains("<script>"), "no inline script (CSP)");
    }

    /// The login hint names the banner in dev mode and the setting (and its secret) otherwise,
    /// and never contains a token.
    #[test]
    fn the_login_hint_says_where_the_token_comes_from() {
        assert!(INDEX_HTML.contains("{{TOKEN_HINT}}"));
        let dev = token_hint(true);
        assert!(dev.contains("banner"), "{dev}");
        assert!(!dev.contains(crate::config::DEV_ADMIN_TOKEN), "{dev}");
        let real = token_hint(false);
        assert!(real.contains("BROKER_ADMIN_TOKEN"), "{real}");
        assert!(real.contains("broker-admin-token"), "{real}");
    }
}
