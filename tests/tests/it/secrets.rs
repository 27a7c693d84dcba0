//! Secrets in the settings: never taken from a command-line flag, read from the environment or a
//! file, refused at start-up when weaker than 128 bits by the strength estimate or when they are
//! the documented dev values off loopback (errors name the setting, never the value), and never
//! printed.

use std::sync::Arc;

use command_api::config::{Config, DEV_ADMIN_TOKEN, DEV_TRACK_TOKEN};
use reqwest::{Method, StatusCode};
use tests::app::{
    spawn_app_with, test_jobs_config, AppOptions, Backend, Sent, ADMIN_TOKEN, TRACK_TOKEN,
};

/// Strong enough for every check, and different from the harness's tokens.
const STRONG: &str = "Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ-strong";
/// 40 digits: long enough for the length rule, about 133 bits; 38 digits: about 126.
const WEAK_DIGITS: &str = "11111111111111111111111111111111111111";

/// A change to a configuration that makes one of its secrets weak.
type Weaken = dyn Fn(&mut Config);

/// The harness's configuration (strong tokens, loopback, embedded store).
fn base() -> Config {
    let mut config = Config::defaults();
    config.api_token = Some(TRACK_TOKEN.into());
    config.admin_token = Some(ADMIN_TOKEN.into());
    config
}

/// Starts (builds) the service from `config`; the start-up error, if any, as one line.
async fn start(config: &Config) -> Result<(), String> {
    let mut config = config.clone();
    config.store.embedded_path = std::env::temp_dir()
        .join(format!("broker-secrets-{}", uuid::Uuid::new_v4()))
        .join("broker.db");
    config.seed_demo_pool = false;
    config.run_jobs = Some(false);
    let service = command_api::startup::build_with(
        &config,
        Arc::new(domain::ManualClock::new(chrono::Utc::now())),
        test_jobs_config(),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    service.stop().await;
    Ok(())
}

/// Every secret setting of the API and the jobs is refused as a command-line flag, naming its
/// variable and never echoing the value (brokerctl has no such flag at all:
/// `brokerctl::cli::tests::no_flag_takes_a_secret`).
#[test]
fn secrets_are_refused_on_the_command_line() {
    let value = "flag-value-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ";
    for (flag, variable) in [
        ("--api-token", "BROKER_API_TOKEN"),
        ("--admin-token", "BROKER_ADMIN_TOKEN"),
        ("--metrics-token", "METRICS_TOKEN"),
        ("--track-credentials-json", "TRACK_CREDENTIALS_JSON"),
        ("--webhooks-json", "WEBHOOKS_JSON"),
        ("--lease-token-key", "LEASE_TOKEN_KEY"),
        ("--lease-token-key-previous", "LEASE_TOKEN_KEY_PREVIOUS"),
        ("--csp-api-token", "CSP_API_TOKEN"),
    ] {
        let refused = runtime::try_parse_settings_from::<Config>(["command-api", flag, value])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{flag} was accepted"));
        assert!(refused.contains(variable), "{flag}: {refused}");
        assert!(!refused.contains(value), "{flag} echoed: {refused}");
    }
    let jobs = runtime::try_parse_settings_from::<jobs::cli::Cli>([
        "jobs",
        "--csp-api-token",
        value,
        "worker",
    ]);
    let refused = jobs.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        refused.contains("CSP_API_TOKEN"),
        "the jobs binary: {refused:?}"
    );
    assert!(!refused.contains(value), "{refused}");
    // Non-secret settings still work as flags.
    assert!(
        runtime::try_parse_settings_from::<Config>(["command-api", "--max-connections", "9"])
            .is_ok_and(|c| c.max_connections == 9)
    );
}

/// The tokens can come from files (`BROKER_API_TOKEN_FILE`, `BROKER_ADMIN_TOKEN_FILE`, their
/// trailing newline dropped): a service so configured serves those tokens over HTTP and refuses
/// others.
#[tokio::test]
async fn tokens_are_read_from_files() {
    let dir = std::env::temp_dir().join(format!("broker-token-files-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let track_file = dir.join("track");
    let admin_file = dir.join("admin");
    std::fs::write(&track_file, format!("{STRONG}-track\n")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&admin_file, format!("{STRONG}-admin\n")).unwrap_or_else(|e| panic!("{e}"));
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| {
        c.api_token = None;
        c.admin_token = None;
        c.api_token_file = Some(track_file);
        c.admin_token_file = Some(admin_file);
    });
    let app = spawn_app_with(options).await;
    let (status, _, body) = app
        .client
        .get(format!("{}/v1/admin/stats", app.url))
        .bearer_auth(format!("{STRONG}-admin"))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = app
        .client
        .get(format!("{}/v1/sandboxes/none", app.url))
        .bearer_auth(format!("{STRONG}-track"))
        .header("X-Instruqt-Sandbox-ID", "stu")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, _) = app.admin(Method::GET, "/v1/admin/stats").sent_json().await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the harness's admin token is not configured"
    );
    app.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let mut both = base();
    both.api_token_file = Some(dir.join("track"));
    let refused = start(&both).await.err().unwrap_or_default();
    assert!(refused.contains("BROKER_API_TOKEN_FILE"), "{refused}");
}

/// A configured secret below 128 bits by the estimate (length × log2 of the alphabet of the
/// character classes it uses) stops start-up with an error that names the setting and not the
/// value: the shared and admin tokens, the metrics token, the lease-token key, a per-track
/// token and a webhook secret. 40 digits pass the length rule and about 133 bits; 38 digits,
/// about 126 bits, do not.
#[tokio::test]
async fn weak_secrets_are_refused_at_start() {
    let forty_digits = format!("{WEAK_DIGITS}23");
    let mut passing = base();
    passing.api_token = Some(forty_digits.as_str().into());
    assert_eq!(start(&passing).await, Ok(()), "40 digits are enough");

    let cases: Vec<(&str, Box<Weaken>)> = vec![
        (
            "BROKER_API_TOKEN",
            Box::new(|c| c.api_token = Some(WEAK_DIGITS.into())),
        ),
        (
            "BROKER_ADMIN_TOKEN",
            Box::new(|c| c.admin_token = Some(WEAK_DIGITS.into())),
        ),
        (
            "METRICS_TOKEN",
            Box::new(|c| c.metrics_token = Some(WEAK_DIGITS.into())),
        ),
        (
            "LEASE_TOKEN_KEY",
            Box::new(|c| c.lease_token_key = Some(WEAK_DIGITS.into())),
        ),
        (
            "the token",
            Box::new(|c| {
                c.track_credentials_json = Some(
                    serde_json::json!({"tracks": [{"track": "lab", "token": WEAK_DIGITS,
                        "name_prefixes": ["lab-"], "max_concurrent_allocations": 5}]})
                    .to_string()
                    .into(),
                );
            }),
        ),
        (
            "its secret",
            Box::new(|c| {
                c.webhooks_json = Some(
                    serde_json::json!({"subscribers": [{"name": "hook",
                        "url": "https://hooks.example.com/x", "secret": WEAK_DIGITS}]})
                    .to_string()
                    .into(),
                );
            }),
        ),
    ];
    for (setting, weaken) in cases {
        let mut config = base();
        weaken(&mut config);
        let refused = start(&config).await.err().unwrap_or_default();
        assert!(refused.contains(setting), "{setting}: {refused:?}");
        assert!(refused.contains("128 bits"), "{setting}: {refused:?}");
        assert!(
            !refused.contains("1111"),
            "{setting} echoed its value: {refused}"
        );
    }
}

/// The documented dev tokens and dev lease-token key — left unset, or set to their documented
/// values — are refused on any address but loopback; on loopback they start and serve, exempt
/// from the strength rule.
#[tokio::test]
async fn dev_tokens_only_on_loopback() {
    for bind in ["0.0.0.0:8080", "192.0.2.10:8080", "[::]:8080"] {
        let mut unset = base();
        unset.bind_addr = bind.parse().unwrap_or_else(|e| panic!("{e}"));
        unset.lease_token_key = Some(STRONG.into());
        unset.api_token = None;
        unset.admin_token = None;
        let refused = start(&unset).await.err().unwrap_or_default();
        assert!(refused.contains("BROKER_API_TOKEN"), "{bind}: {refused}");

        let mut documented = unset.clone();
        documented.api_token = Some(DEV_TRACK_TOKEN.into());
        documented.admin_token = Some(DEV_ADMIN_TOKEN.into());
        let refused = start(&documented).await.err().unwrap_or_default();
        assert!(
            refused.contains("BROKER_API_TOKEN") && refused.contains("dev tokens"),
            "{bind}: {refused}"
        );

        let mut dev_key = base();
        dev_key.bind_addr = unset.bind_addr;
        dev_key.lease_token_key = Some(command_api::lease::DEV_LEASE_TOKEN_KEY.into());
        let refused = start(&dev_key).await.err().unwrap_or_default();
        assert!(refused.contains("LEASE_TOKEN_KEY"), "{bind}: {refused}");
    }

    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.api_token = None;
        c.admin_token = Some(DEV_ADMIN_TOKEN.into());
    });
    let app = spawn_app_with(options).await;
    let (status, _, body) = app
        .client
        .get(format!("{}/v1/admin/stats", app.url))
        .bearer_auth(DEV_ADMIN_TOKEN)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "dev tokens on loopback: {body}");
    app.stop().await;
}

/// No secret shows in the `Debug` output of the API's or the jobs' settings.
#[test]
fn settings_never_print_a_secret() {
    let mut config = base();
    let secrets = [
        "api-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ",
        "admin-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0a",
        "metrics-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0",
        "lease-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ",
        "previous-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5g",
        "tracks-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0a",
        "hooks-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ",
        "csp-Kx7pQ2mV9sL4wR8tY3nB6cF1hJ5gD0aZ12",
    ];
    config.api_token = Some(secrets[0].into());
    config.admin_token = Some(secrets[1].into());
    config.metrics_token = Some(secrets[2].into());
    config.lease_token_key = Some(secrets[3].into());
    config.lease_token_key_previous = Some(secrets[4].into());
    config.track_credentials_json = Some(secrets[5].into());
    config.webhooks_json = Some(secrets[6].into());
    config.jobs.csp_api_token = Some(secrets[7].into());
    let mut jobs = test_jobs_config();
    jobs.csp.api_token = secrets[7].into();
    let printed = format!("{config:?} {config:#?} {jobs:?}");
    for secret in secrets {
        assert!(!printed.contains(secret), "{secret} printed");
    }
}
