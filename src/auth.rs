//! Who may connect and who may publish: connection tokens (HS256 JWT), the insecure `?uid=`
//! mode, the browser origin allowlist, and internal API keys.
//!
//! Everything is decided before the WebSocket handshake completes, so a refused client gets a
//! plain HTTP status and never a 101. Tokens and keys never reach a log line.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::channel::valid_name;
use crate::settings;

/// Claims of a connection token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id (a JSON string, or a number as many frameworks write it).
    #[serde(deserialize_with = "string_or_number")]
    pub sub: String,
    /// Expiry, seconds since the Unix epoch; required.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, seconds since the Unix epoch; checked when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Topic channels the holder may join: exact names or `prefix*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::Text(s) => s,
        Id::Number(n) => n.to_string(),
    })
}

/// An authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    pub channels: Vec<String>,
}

/// Why a connection or API call was refused. The `Display` text is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: pass ?token= or Authorization: Bearer")]
    MissingToken,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("invalid user id: {}", crate::channel::NAME_RULE)]
    BadUser,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("malformed Origin header")]
    BadOrigin,
    #[error("missing or unknown API key")]
    BadApiKey,
}

impl AuthError {
    /// Bounded label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Expired => "expired_token",
            Self::NotYetValid => "early_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::BadUser => "bad_user",
            Self::OriginNotAllowed | Self::BadOrigin => "origin",
            Self::BadApiKey => "api_key",
        }
    }
}

#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Demo mode only: a random per-process key for `/demo/token`, so a demo token is valid
    /// on this node alone and never shares the production secret.
    demo: Option<(EncodingKey, DecodingKey)>,
    validation: Validation,
    insecure_uid: bool,
    api_keys: Arc<[String]>,
    /// Allowed origins, normalised ([`normalize_origin`]).
    origins: Arc<[String]>,
}

/// The jsonwebtoken error text for a signature mismatch (the demo key is tried next).
const BAD_SIGNATURE: &str = "bad signature";

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of debug output.
        f.debug_struct("Authenticator")
            .field("insecure_uid", &self.insecure_uid)
            .field("demo", &self.demo.is_some())
            .field("api_keys", &self.api_keys.len())
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// With an empty `jwt_secret` (allowed only in demo or insecure mode) a random per-process
    /// secret signs and checks tokens.
    pub fn new(auth: &settings::Auth) -> Self {
        let secret = if auth.jwt_secret.is_empty() { random_secret() } else { auth.jwt_secret.as_bytes().to_vec() };
        // Only HS256: `alg: none` and every other algorithm are refused.
        let mut validation = Validation::new(Algorithm::HS256);
        // `sub` is required by `Claims` itself, which also takes a number (jsonwebtoken's own
        // check would refuse one).
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = auth.clock_skew.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        if auth.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&auth.issuer]);
        }
        if auth.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&auth.audience]);
        }
        Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            demo: None,
            validation,
            insecure_uid: auth.insecure_uid,
            api_keys: auth.api_keys.clone().into(),
            origins: auth.allowed_origins.iter().map(|o| normalize_origin(o).unwrap_or_else(|| o.clone())).collect(),
        }
    }

    /// Adds the demo key ([`Authenticator::issue_demo`]), a fresh random one.
    #[must_use]
    pub fn with_demo(mut self) -> Self {
        let secret = random_secret();
        self.demo = Some((EncodingKey::from_secret(&secret), DecodingKey::from_secret(&secret)));
        self
    }

    /// Authenticates an upgrade request from its `?token=`, `Authorization: Bearer` or, in
    /// insecure mode only, `?uid=`.
    pub fn authenticate(&self, token: Option<&str>, uid: Option<&str>) -> Result<Identity, AuthError> {
        if let Some(token) = token {
            return self.verify(token);
        }
        match uid {
            Some(uid) if self.insecure_uid => {
                if !valid_name(uid) {
                    return Err(AuthError::BadUser);
                }
                Ok(Identity { user: uid.into(), channels: Vec::new() })
            }
            _ => Err(AuthError::MissingToken),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let result = match (self.decode(token, &self.decoding), &self.demo) {
            (Err(AuthError::InvalidToken(BAD_SIGNATURE)), Some((_, demo))) => self.decode(token, demo),
            (result, _) => result,
        };
        let claims = result?;
        if !valid_name(&claims.sub) {
            return Err(AuthError::BadUser);
        }
        Ok(Identity { user: claims.sub.into(), channels: claims.channels })
    }

    fn decode(&self, token: &str, key: &DecodingKey) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::InvalidToken(BAD_SIGNATURE),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::InvalidToken("algorithm must be HS256")
            }
            ErrorKind::MissingRequiredClaim(_) => AuthError::InvalidToken("exp is required"),
            ErrorKind::InvalidClaimFormat(_) => AuthError::InvalidToken("exp and nbf must be numbers"),
            ErrorKind::InvalidIssuer => AuthError::InvalidToken("wrong issuer (iss)"),
            ErrorKind::InvalidAudience => AuthError::InvalidToken("wrong audience (aud)"),
            ErrorKind::Json(_) => AuthError::InvalidToken("claims: sub (string or number) and exp are required"),
            _ => AuthError::InvalidToken("malformed"),
        })?;
        // RFC 7515 4.1.11: a `crit` header names extensions the verifier must understand; this
        // one understands none, so such a token is refused rather than half-checked.
        if data.header.crit.is_some() {
            return Err(AuthError::InvalidToken("crit header parameters are not supported"));
        }
        Ok(data.claims)
    }

    /// Signs a connection token for `user`, valid for `ttl`.
    pub fn issue(&self, user: &str, ttl: Duration, channels: Vec<String>) -> Result<String, AuthError> {
        self.sign(&self.encoding, user, ttl, channels)
    }

    /// Signs a demo token with the per-process demo key: valid on this node only.
    pub fn issue_demo(&self, user: &str, ttl: Duration, channels: Vec<String>) -> Result<String, AuthError> {
        let (key, _) = self.demo.as_ref().ok_or(AuthError::InvalidToken("demo mode is off"))?;
        self.sign(key, user, ttl, channels)
    }

    fn sign(&self, key: &EncodingKey, user: &str, ttl: Duration, channels: Vec<String>) -> Result<String, AuthError> {
        if !valid_name(user) {
            return Err(AuthError::BadUser);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = Claims { sub: user.to_owned(), exp: now + ttl.as_secs(), iat: Some(now), nbf: None, channels };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|_| AuthError::InvalidToken("cannot sign"))
    }

    /// Whether a browser may connect, given every `Origin` header of the request. No header
    /// (a non-browser client) is allowed. With an allowlist, the header must be one
    /// well-formed origin (`scheme://host[:port]`) on the list; two headers, or one that does
    /// not parse, are refused rather than guessed at.
    pub fn check_origin<'a>(&self, mut origins: impl Iterator<Item = &'a [u8]>) -> Result<(), AuthError> {
        if self.origins.is_empty() {
            return Ok(());
        }
        let Some(first) = origins.next() else { return Ok(()) };
        if origins.next().is_some() {
            return Err(AuthError::BadOrigin);
        }
        let origin = std::str::from_utf8(first).ok().and_then(normalize_origin).ok_or(AuthError::BadOrigin)?;
        if self.origins.contains(&origin) { Ok(()) } else { Err(AuthError::OriginNotAllowed) }
    }

    /// Checks an internal API `Authorization` header value. With no keys configured (demo mode
    /// only, on loopback) the API is open.
    pub fn check_api_key(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        if self.api_keys.is_empty() {
            // Open only in demo mode (validation keeps that on loopback); otherwise a node
            // without keys (a Pusher-only node) has its native API closed.
            return if self.demo.is_some() { Ok(()) } else { Err(AuthError::BadApiKey) };
        }
        let presented = authorization.and_then(bearer).ok_or(AuthError::BadApiKey)?;
        // Compare every key in full so timing does not reveal which one nearly matched.
        let matched =
            self.api_keys.iter().fold(false, |acc, key| acc | constant_time_eq(key.as_bytes(), presented.as_bytes()));
        if matched { Ok(()) } else { Err(AuthError::BadApiKey) }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// An `Origin` value in canonical form (`scheme://host[:port]`, lower-case host, default port
/// dropped), or `None` if it is not a serialised origin. `null` (opaque origins) is kept as is.
pub fn normalize_origin(origin: &str) -> Option<String> {
    if origin == "null" {
        return Some(origin.to_owned());
    }
    let url = url::Url::parse(origin).ok()?;
    // An origin is scheme, host and port only; anything else means it is not one.
    let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none() && url.username().is_empty();
    let serialised = url.origin().ascii_serialization();
    (bare && url.has_host() && !origin.ends_with('/')).then_some(serialised)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    // The OS generator failing is not recoverable in any useful way; fall back to a weaker
    // seed rather than refuse to start a loopback-only demo.
    if getrandom::fill(&mut secret).is_err() {
        secret.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(insecure_uid: bool) -> Authenticator {
        Authenticator::new(&settings::Auth {
            jwt_secret: "s".repeat(32),
            api_keys: vec!["k".repeat(16)],
            insecure_uid,
            allowed_origins: vec!["https://app.example".into()],
            clock_skew: Duration::from_secs(0),
            ..Default::default()
        })
    }

    #[test]
    fn issued_tokens_verify_and_carry_channels() {
        let a = auth(false);
        let token = a.issue("42", Duration::from_secs(60), vec!["news".into()]).unwrap();
        assert_eq!(a.verify(&token), Ok(Identity { user: "42".into(), channels: vec!["news".into()] }));
    }

    #[test]
    fn forged_expired_and_unsigned_tokens_are_refused() {
        let a = auth(false);
        let other = Authenticator::new(&settings::Auth { jwt_secret: "x".repeat(32), ..Default::default() });
        let forged = other.issue("42", Duration::from_secs(60), vec![]).unwrap();
        assert_eq!(a.verify(&forged), Err(AuthError::InvalidToken("bad signature")));

        let claims = Claims { sub: "42".into(), exp: 1_000, iat: None, nbf: None, channels: vec![] };
        let expired =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(&[b's'; 32])).unwrap();
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));

        // alg: none, built by hand: header {"alg":"none","typ":"JWT"}, empty signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(a.verify(none), Err(AuthError::InvalidToken(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::InvalidToken(_))));
    }

    #[test]
    fn uid_is_accepted_only_in_insecure_mode() {
        assert_eq!(auth(false).authenticate(None, Some("1")), Err(AuthError::MissingToken));
        assert_eq!(auth(true).authenticate(None, Some("1")).unwrap().user.as_ref(), "1");
        assert_eq!(auth(true).authenticate(None, Some("a b")), Err(AuthError::BadUser));
    }

    #[test]
    fn api_keys_and_origins() {
        let a = auth(false);
        assert!(a.check_api_key(Some(&format!("Bearer {}", "k".repeat(16)))).is_ok());
        assert!(a.check_api_key(Some("Bearer nope")).is_err());
        assert!(a.check_api_key(None).is_err());
        let check = |values: &[&str]| a.check_origin(values.iter().map(|v| v.as_bytes()));
        assert!(check(&[]).is_ok());
        assert!(check(&["https://app.example"]).is_ok());
        assert!(check(&["https://APP.example:443"]).is_ok(), "normalised before comparing");
        assert_eq!(check(&["https://evil.example"]), Err(AuthError::OriginNotAllowed));
        assert_eq!(check(&["https://app.example", "https://app.example"]), Err(AuthError::BadOrigin));
        for bad in ["app.example", "https://app.example/path", "https://", "\u{0}", "https://app.example/"] {
            assert_eq!(check(&[bad]), Err(AuthError::BadOrigin), "{bad}");
        }
        // Without an allowlist nothing is refused.
        let open = Authenticator::new(&settings::Auth { jwt_secret: "s".repeat(32), ..Default::default() });
        assert!(open.check_origin(["garbage".as_bytes(), b"x"].into_iter()).is_ok());
    }

    fn sign(claims: &serde_json::Value, header: &Header) -> String {
        jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(&[b's'; 32])).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn numeric_subjects_are_accepted_as_documented() {
        let token = sign(&serde_json::json!({ "sub": 42, "exp": now() + 60 }), &Header::default());
        assert_eq!(auth(false).verify(&token).unwrap().user.as_ref(), "42");
        let missing = sign(&serde_json::json!({ "exp": now() + 60 }), &Header::default());
        assert!(matches!(auth(false).verify(&missing), Err(AuthError::InvalidToken(_))));
    }

    #[test]
    fn not_before_and_crit_are_honoured() {
        let early =
            sign(&serde_json::json!({ "sub": "1", "exp": now() + 600, "nbf": now() + 300 }), &Header::default());
        assert_eq!(auth(false).verify(&early), Err(AuthError::NotYetValid));
        let ready = sign(&serde_json::json!({ "sub": "1", "exp": now() + 600, "nbf": now() - 1 }), &Header::default());
        assert!(auth(false).verify(&ready).is_ok());
        let header = Header { crit: Some(vec!["exp".into()]), ..Default::default() };
        let crit = sign(&serde_json::json!({ "sub": "1", "exp": now() + 600 }), &header);
        assert!(matches!(auth(false).verify(&crit), Err(AuthError::InvalidToken(m)) if m.contains("crit")));
    }

    #[test]
    fn issuer_and_audience_are_checked_only_when_configured() {
        let claims = serde_json::json!({ "sub": "1", "exp": now() + 600, "iss": "app", "aud": ["push", "x"] });
        let token = sign(&claims, &Header::default());
        assert!(auth(false).verify(&token).is_ok(), "ignored when not configured");
        let strict = |issuer: &str, audience: &str| {
            Authenticator::new(&settings::Auth {
                jwt_secret: "s".repeat(32),
                issuer: issuer.into(),
                audience: audience.into(),
                ..Default::default()
            })
        };
        assert!(strict("app", "push").verify(&token).is_ok());
        assert_eq!(strict("other", "").verify(&token), Err(AuthError::InvalidToken("wrong issuer (iss)")));
        assert_eq!(strict("", "else").verify(&token), Err(AuthError::InvalidToken("wrong audience (aud)")));
    }

    #[test]
    fn demo_tokens_use_their_own_key() {
        let node = auth(false).with_demo();
        let demo = node.issue_demo("7", Duration::from_secs(60), vec![]).unwrap();
        assert_eq!(node.verify(&demo).unwrap().user.as_ref(), "7");
        // Another node with the same production secret does not take it.
        assert_eq!(auth(false).with_demo().verify(&demo), Err(AuthError::InvalidToken("bad signature")));
        assert_eq!(auth(false).verify(&demo), Err(AuthError::InvalidToken("bad signature")));
        assert!(auth(false).issue_demo("7", Duration::from_secs(60), vec![]).is_err());
    }
}
