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
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("invalid user id: 1 to 128 of A-Z a-z 0-9 _ - . : @ =")]
    BadUser,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("missing or unknown API key")]
    BadApiKey,
}

impl AuthError {
    /// Bounded label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Expired => "expired_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::BadUser => "bad_user",
            Self::OriginNotAllowed => "origin",
            Self::BadApiKey => "api_key",
        }
    }
}

#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    insecure_uid: bool,
    api_keys: Arc<[String]>,
    origins: Arc<[String]>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of debug output.
        f.debug_struct("Authenticator")
            .field("insecure_uid", &self.insecure_uid)
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
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = auth.clock_skew.as_secs();
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            insecure_uid: auth.insecure_uid,
            api_keys: auth.api_keys.clone().into(),
            origins: auth.allowed_origins.clone().into(),
        }
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
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::InvalidToken("bad signature"),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::InvalidToken("algorithm must be HS256")
                }
                ErrorKind::MissingRequiredClaim(_) => AuthError::InvalidToken("exp and sub are required"),
                _ => AuthError::InvalidToken("malformed"),
            })?;
        let claims = data.claims;
        if !valid_name(&claims.sub) {
            return Err(AuthError::BadUser);
        }
        Ok(Identity { user: claims.sub.into(), channels: claims.channels })
    }

    /// Signs a connection token for `user`, valid for `ttl`.
    pub fn issue(&self, user: &str, ttl: Duration, channels: Vec<String>) -> Result<String, AuthError> {
        if !valid_name(user) {
            return Err(AuthError::BadUser);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = Claims { sub: user.to_owned(), exp: now + ttl.as_secs(), iat: Some(now), channels };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| AuthError::InvalidToken("cannot sign"))
    }

    /// Whether a browser `Origin` may connect. No header (a non-browser client) is allowed.
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), AuthError> {
        match origin {
            Some(origin) if !self.origins.is_empty() && !self.origins.iter().any(|o| o == origin) => {
                Err(AuthError::OriginNotAllowed)
            }
            _ => Ok(()),
        }
    }

    /// Checks an internal API `Authorization` header value. With no keys configured (demo mode
    /// only, on loopback) the API is open.
    pub fn check_api_key(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        if self.api_keys.is_empty() {
            return Ok(());
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

        let claims = Claims { sub: "42".into(), exp: 1_000, iat: None, channels: vec![] };
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
        assert!(a.check_origin(None).is_ok());
        assert!(a.check_origin(Some("https://app.example")).is_ok());
        assert_eq!(a.check_origin(Some("https://evil.example")), Err(AuthError::OriginNotAllowed));
    }
}
