//! Who a client is: JWT verification (HS256 with a shared secret, RS256 or
//! ES256 with a PEM public key; `jsonwebtoken` does the cryptography) and
//! what a verified token allows.
//!
//! A token's claims: `sub` (the user id, required), `exp` (required) and
//! `nbf` (if present) enforced with `auth.leeway`; optional `rooms` (names
//! or `prefix*` patterns it may join; absent: any), `send` (may it publish;
//! default true) and `info` (a small JSON object roomcast attaches to the
//! user's messages). `alg` must be the configured algorithm: `none`, or an
//! HS256 token signed with an RSA public key as secret, never passes.

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::AuthConfig;
use crate::protocol::{valid_room, valid_user};

/// A verified client.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`: the user id.
    pub user: Arc<str>,
    /// `rooms`: what it may join; `None`: any room.
    pub rooms: Option<Vec<RoomPattern>>,
    /// `send`: it may publish (rooms and users).
    pub can_send: bool,
    /// `info`: attached to its messages.
    pub info: Option<Arc<RawValue>>,
    /// `exp`, in Unix seconds.
    pub expires: u64,
}

impl Identity {
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(room)))
    }
}

/// A room name, or a prefix (`live:*`; `*` alone is any room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPattern {
    Exact(String),
    Prefix(String),
}

impl RoomPattern {
    fn parse(pattern: &str) -> Option<RoomPattern> {
        match pattern.strip_suffix('*') {
            Some("") => Some(RoomPattern::Prefix(String::new())),
            Some(prefix) => valid_room(prefix).then(|| RoomPattern::Prefix(prefix.to_owned())),
            None => valid_room(pattern).then(|| RoomPattern::Exact(pattern.to_owned())),
        }
    }

    pub fn matches(&self, room: &str) -> bool {
        match self {
            RoomPattern::Exact(r) => r == room,
            RoomPattern::Prefix(p) => room.starts_with(p.as_str()),
        }
    }
}

/// Why a token was refused: the reason label of
/// `roomcast_auth_failures_total` and the start of the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is needed (anonymous connections are not allowed here)")]
    Missing,
    #[error("this node accepts no tokens (auth.algorithm is not set)")]
    Disabled,
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token is signed with another algorithm than this node's")]
    BadAlgorithm,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's claims are not valid: {0}")]
    BadClaims(String),
}

impl AuthError {
    /// Every reason, for metrics that must show each one from the start.
    /// (`forbidden` counts tokens that verify but do not allow a URL's room.)
    pub const REASONS: [&'static str; 9] = [
        "missing",
        "disabled",
        "malformed",
        "bad_algorithm",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "bad_claims",
        "forbidden",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Disabled => "disabled",
            AuthError::Malformed => "malformed",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadClaims(_) => "bad_claims",
        }
    }
}

/// The claims roomcast reads (others are ignored).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    send: Option<bool>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// The node's token verifier (none when `auth.algorithm` is empty).
pub struct Verifier {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
    max_info_bytes: usize,
}

impl Verifier {
    /// The verifier `config` describes; `Ok(None)` without an algorithm.
    /// The error names what is wrong with the key (config.rs adds the key name).
    pub fn new(config: &AuthConfig) -> Result<Option<Verifier>, String> {
        let Some(algorithm) = config.algorithm else {
            return Ok(None);
        };
        let key = match algorithm {
            Algorithm::HS256 => DecodingKey::from_secret(&config.key),
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&config.key)
                .map_err(|e| format!("not an RSA public key in PEM: {e}"))?,
            Algorithm::ES256 => DecodingKey::from_ec_pem(&config.key)
                .map_err(|e| format!("not an EC public key in PEM: {e}"))?,
            other => return Err(format!("{other:?} is not supported")),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Ok(Some(Verifier {
            algorithm,
            key,
            validation,
            max_info_bytes: config.max_info_bytes,
        }))
    }

    /// Verify `token` and read what it allows.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| self.classify(token, e.into_kind()))?;
        let claims = data.claims;
        if !valid_user(&claims.sub) {
            return Err(AuthError::BadClaims(
                "`sub` must be 1-128 bytes without control characters".into(),
            ));
        }
        let rooms = match claims.rooms {
            None => None,
            Some(patterns) => Some(
                patterns
                    .iter()
                    .map(|p| {
                        RoomPattern::parse(p).ok_or_else(|| {
                            AuthError::BadClaims(format!(
                                "`rooms` entry {:?} is not a room name or a prefix*",
                                crate::protocol::brief(p)
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let info = match claims.info {
            None => None,
            Some(info) if !info.get().trim_start().starts_with('{') => {
                return Err(AuthError::BadClaims("`info` must be a JSON object".into()))
            }
            Some(info) if info.get().len() > self.max_info_bytes => {
                return Err(AuthError::BadClaims(format!(
                    "`info` is larger than auth.max_info_bytes ({})",
                    self.max_info_bytes
                )))
            }
            Some(info) => Some(Arc::from(info)),
        };
        Ok(Identity {
            user: Arc::from(claims.sub),
            rooms,
            can_send: claims.send.unwrap_or(true),
            info,
            expires: claims.exp,
        })
    }

    fn classify(&self, token: &str, kind: ErrorKind) -> AuthError {
        match kind {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::BadAlgorithm
            }
            ErrorKind::MissingRequiredClaim(claim) => {
                AuthError::BadClaims(format!("`{claim}` is required"))
            }
            ErrorKind::Json(_) if self.header_names_another_alg(token) => AuthError::BadAlgorithm,
            ErrorKind::Json(e) if e.is_data() => AuthError::BadClaims(e.to_string()),
            _ => AuthError::Malformed,
        }
    }

    /// The header parses as JSON but names an algorithm that is not ours
    /// (`none`, which `jsonwebtoken` cannot even represent, or another).
    fn header_names_another_alg(&self, token: &str) -> bool {
        let Some(header) = token.split('.').next() else {
            return false;
        };
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
            return false;
        };
        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        serde_json::from_slice::<Header>(&bytes)
            .is_ok_and(|h| h.alg != format!("{:?}", self.algorithm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns() {
        let p = |s: &str| RoomPattern::parse(s).unwrap();
        assert!(p("live:*").matches("live:42"));
        assert!(!p("live:*").matches("dm:1"));
        assert!(p("*").matches("anything"));
        assert!(p("r1").matches("r1"));
        assert!(!p("r1").matches("r10"));
        assert!(RoomPattern::parse("bad room").is_none());
        assert!(RoomPattern::parse("a*b").is_none());
    }
}
