//! The token state machine over a local test server: what a 403 leads to (lookup-self, a new
//! login, a retry), an identity whose policy refuses lookup-self, and the renewer's plan.

use std::sync::Arc;

use super::*;
use crate::metrics::Metrics;
use crate::source::vault::test_server::{self, json_answer, requests_seen, Seen};
use crate::source::vault::VaultServer;

const FORBIDDEN: &str = r#"{"errors":["permission denied"]}"#;
const LOGIN: &str = r#"{"auth":{"client_token":"fresh","lease_duration":3600,"renewable":true}}"#;
const SECRET: &str = r#"{"data":{"data":{"k":"v"}}}"#;

/// A login identity (JWT at `auth/jwt` as role `app`) on a test server answering `answer(path,
/// token)`, where `path` is the request line's API path and `token` the `X-Vault-Token` sent.
fn identity(
    answer: impl Fn(&str, &str) -> (&'static str, &'static str) + Send + Sync + 'static,
) -> (Tokens, Client, Seen) {
    let (addr, seen) = test_server::serve(move |head| {
        let (path, token) = path_and_token(head);
        let (status, body) = answer(path, token.as_deref().unwrap_or_default());
        json_answer(status, body, false)
    });
    let server =
        VaultServer::new(&test_server::config(&addr, Duration::from_secs(5))).expect("server");
    let client = Client::new(
        Arc::new(server),
        "test-volume".into(),
        Arc::new(Metrics::new()),
    );
    let tokens = Tokens::new(Auth::Login {
        method: LoginMethod::Jwt,
        mount: "jwt".into(),
        role: "app".into(),
        credential: Credential::Value(Token::new("a-jwt".into())),
    });
    (tokens, client, seen)
}

/// A predecessor's session of token `old`, valid for another hour: not fresh from a login, so
/// a 403 may mean Vault revoked it.
fn taken_over(tokens: &Tokens) {
    let in_an_hour = NodeTime::from_duration(NodeTime::now().as_duration() + hours(1));
    assert!(tokens.resume(Session {
        token: Token::new("old".into()),
        expires_at: Some(in_an_hour),
        full_ttl: hours(1),
        next: SessionStep::Renew(in_an_hour),
    }));
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// A request head's API path and the `X-Vault-Token` it sent, if any.
fn path_and_token(head: &str) -> (&str, Option<String>) {
    let path = head.split(' ').nth(1).unwrap_or_default();
    let token = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("x-vault-token: ")
            .map(|t| t.trim().to_string())
    });
    (path, token)
}

/// Each request seen as `path token` (`-`: none).
fn requests(seen: &[String]) -> Vec<String> {
    seen.iter()
        .map(|head| {
            let (path, token) = path_and_token(head);
            format!("{path} {}", token.as_deref().unwrap_or("-"))
        })
        .collect()
}

async fn read(tokens: &Tokens, client: &Client) -> Result<Value, SourceError> {
    let kind = RequestKind::Read;
    tokens
        .authed(client, kind, Method::GET, "secret/data/app", None)
        .await
}

/// How far `at` is from `after` from now, in whole seconds.
fn off_by(at: NodeTime, after: Duration) -> u64 {
    let want = NodeTime::now().as_duration() + after;
    want.abs_diff(at.as_duration()).as_secs()
}

#[tokio::test]
async fn a_403_to_a_token_lookup_self_refuses_logs_in_again_retries_and_revokes_the_old_one() {
    let (tokens, client, seen) = identity(|path, token| match (path, token) {
        ("/v1/secret/data/app", "fresh") => ("200 OK", SECRET),
        ("/v1/auth/jwt/login", _) => ("200 OK", LOGIN),
        ("/v1/auth/token/revoke-self", _) => ("204 No Content", ""),
        _ => ("403 Forbidden", FORBIDDEN),
    });
    taken_over(&tokens);
    let answer = read(&tokens, &client)
        .await
        .expect("retried with a new token");
    assert_eq!(answer["data"]["data"]["k"], "v");
    let seen = requests(&requests_seen(&seen, 5).await);
    assert_eq!(
        seen,
        [
            "/v1/secret/data/app old",
            "/v1/auth/token/lookup-self old",
            "/v1/auth/jwt/login -",
            "/v1/secret/data/app fresh",
            "/v1/auth/token/revoke-self old",
        ]
    );
    let session = tokens.session().expect("a session");
    assert_eq!(session.token, Token::new("fresh".into()));
    assert!(
        !tokens.lookup_forbidden.load(Ordering::Relaxed),
        "an old token's refused lookup says nothing of the policy"
    );
}

#[tokio::test]
async fn a_403_to_a_token_lookup_self_accepts_is_a_policy_denial_without_a_login() {
    let (tokens, client, seen) = identity(|path, _| match path {
        "/v1/auth/token/lookup-self" => ("200 OK", r#"{"data":{"ttl":3000}}"#),
        "/v1/auth/jwt/login" => ("200 OK", LOGIN),
        _ => ("403 Forbidden", FORBIDDEN),
    });
    taken_over(&tokens);
    let err = read(&tokens, &client).await.unwrap_err();
    assert_eq!(err, SourceError::PermissionDenied);
    let seen = requests(&requests_seen(&seen, 2).await);
    assert_eq!(
        seen,
        ["/v1/secret/data/app old", "/v1/auth/token/lookup-self old"]
    );
    assert_eq!(tokens.session().unwrap().token, Token::new("old".into()));
}

#[tokio::test]
async fn an_identity_whose_policy_refuses_lookup_self_learns_it_and_then_takes_403s_as_denials() {
    let (tokens, client, seen) = identity(|path, _| match path {
        "/v1/auth/jwt/login" => ("200 OK", LOGIN),
        _ => ("403 Forbidden", FORBIDDEN),
    });
    taken_over(&tokens);
    // The old token's lookup is refused: log in, retry, refused again; the fresh token's
    // lookup is refused too, which only the policy can explain.
    let err = read(&tokens, &client).await.unwrap_err();
    assert_eq!(err, SourceError::PermissionDenied);
    let first = requests(&requests_seen(&seen, 5).await);
    assert_eq!(
        first,
        [
            "/v1/secret/data/app old",
            "/v1/auth/token/lookup-self old",
            "/v1/auth/jwt/login -",
            "/v1/secret/data/app fresh",
            "/v1/auth/token/lookup-self fresh",
        ],
        "the old token may be alive: not revoked"
    );
    assert!(tokens.lookup_forbidden.load(Ordering::Relaxed));
    // Long after the login: a 403 is still a denial, asked once, with no lookup and no login.
    *tokens.last_login.lock() = Instant::now().checked_sub(MIN_RELOGIN_INTERVAL);
    let err = read(&tokens, &client).await.unwrap_err();
    assert_eq!(err, SourceError::PermissionDenied);
    let all = requests(&requests_seen(&seen, 6).await);
    assert_eq!(all[5], "/v1/secret/data/app fresh");
}

#[tokio::test]
async fn a_login_plans_a_renewal_two_thirds_in_and_a_capped_renewal_a_replacement_before_expiry() {
    let (tokens, client, _) = identity(|path, _| match path {
        "/v1/auth/jwt/login" => ("200 OK", LOGIN),
        // The max TTL leaves ten minutes.
        "/v1/auth/token/renew-self" => (
            "200 OK",
            r#"{"auth":{"client_token":"fresh","lease_duration":600,"renewable":true}}"#,
        ),
        _ => ("403 Forbidden", FORBIDDEN),
    });
    tokens.login(&client).await.expect("logged in");
    let session = tokens.session().expect("a session");
    let SessionStep::Renew(at) = session.next else {
        panic!("{:?}", session.next);
    };
    assert!(off_by(at, Duration::from_secs(2400)) <= 1, "{at:?}");
    assert!(off_by(session.expires_at.unwrap(), hours(1)) <= 1);
    assert_eq!(session.full_ttl, hours(1));

    let fresh = Token::new("fresh".into());
    tokens.renew_self(&client, &fresh).await.expect("renewed");
    let session = tokens.session().expect("a session");
    let SessionStep::Replace(at) = session.next else {
        panic!("{:?}", session.next);
    };
    // A tenth of the full TTL, at most 30 s, before the end.
    assert!(off_by(at, Duration::from_secs(570)) <= 1, "{at:?}");
}

#[tokio::test]
async fn a_refused_renewal_drops_the_login_token_and_a_failed_one_is_retried_with_a_back_off() {
    let (tokens, client, _) = identity(|_, _| ("200 OK", LOGIN));
    tokens.login(&client).await.expect("logged in");
    let fresh = Token::new("fresh".into());
    let renew = TokenStep::Renew(Instant::now());
    let down = SourceError::Unavailable("down".into());
    tokens.renewal_failed(&client, &fresh, renew, &down);
    tokens.renewal_failed(&client, &fresh, renew, &down);
    let SessionStep::Renew(at) = tokens.session().unwrap().next else {
        panic!("still renewed");
    };
    assert!(off_by(at, RENEW_RETRY * 2) <= 1, "doubled: {at:?}");
    tokens.renewal_failed(&client, &fresh, renew, &SourceError::PermissionDenied);
    assert_eq!(tokens.session(), None, "the next request logs in again");
}

#[tokio::test]
async fn a_given_token_is_looked_up_first_then_renewed_two_thirds_into_its_ttl() {
    let (addr, seen) = test_server::serve(|_| {
        json_answer(
            "200 OK",
            r#"{"data":{"ttl":600,"creation_ttl":600,"renewable":true}}"#,
            false,
        )
    });
    let server = VaultServer::new(&test_server::config(&addr, Duration::from_secs(5))).unwrap();
    let client = Client::new(Arc::new(server), "v".into(), Arc::new(Metrics::new()));
    let given = Token::new("given".into());
    let tokens = Tokens::new(Auth::Token(given.clone()));
    assert!(matches!(
        tokens.session().unwrap().next,
        SessionStep::LookUp(_)
    ));
    tokens
        .lookup_self(&client, &given)
        .await
        .expect("looked up");
    let session = tokens.session().unwrap();
    let SessionStep::Renew(at) = session.next else {
        panic!("{:?}", session.next);
    };
    assert!(off_by(at, Duration::from_secs(400)) <= 1, "{at:?}");
    assert!(off_by(session.expires_at.unwrap(), Duration::from_secs(600)) <= 1);
    assert_eq!(requests(&seen.lock()), ["/v1/auth/token/lookup-self given"]);
}

#[tokio::test]
async fn a_revoked_identity_is_closed_and_its_reads_never_log_in_again() {
    let (tokens, client, seen) = identity(|path, _| match path {
        "/v1/auth/jwt/login" => ("200 OK", LOGIN),
        _ => ("204 No Content", ""),
    });
    tokens.login(&client).await.expect("logged in");
    tokens.revoke(&client).await;
    assert_eq!(tokens.session(), None);
    assert_eq!(read(&tokens, &client).await, Err(SourceError::Closed));
    assert!(!tokens.resume(Session {
        token: Token::new("old".into()),
        expires_at: None,
        full_ttl: hours(1),
        next: SessionStep::Idle,
    }));
    let seen = requests(&requests_seen(&seen, 2).await);
    assert_eq!(
        seen,
        ["/v1/auth/jwt/login -", "/v1/auth/token/revoke-self fresh"]
    );
}
