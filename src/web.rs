//! What the gateway serves to browsers, embedded in the binary: the
//! JavaScript SDK (`/sdk/roomcast.js`, `clients/js/`), the live-room demo
//! page (`/`, `clients/demo/index.html`, unless `demo.enabled` is off), and
//! — for the demo only, with `demo.dev_tokens` — signed development tokens
//! (`/demo/token?user=…`).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::error::ErrorCode;
use crate::gateway::Gateway;
use crate::server::{json_response, refuse, Body};

pub const SDK: &str = include_str!("../clients/js/roomcast.js");
pub const SDK_TYPES: &str = include_str!("../clients/js/roomcast.d.ts");
pub const DEMO: &str = include_str!("../clients/demo/index.html");

/// The SDK's version: the crate's (a unit test holds `VERSION` in the file to it).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The versioned SDK path, cached for a year (it never changes).
pub fn versioned_sdk_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| format!("/sdk/roomcast@{SDK_VERSION}.js"))
}

/// How long a development token lasts.
const DEV_TOKEN_SECONDS: u64 = 600;

/// A strong validator of an embedded file: its FNV-1a hash.
fn etag(content: &str) -> String {
    let hash = content.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("\"{hash:016x}\"")
}

/// An embedded file, answered 304 when the client holds this version.
fn file(
    request: &HeaderMap,
    content: &'static str,
    content_type: &'static str,
    cache: &'static str,
) -> Response<Body> {
    let tag = etag(content);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = Response::new(Full::new(match fresh {
        true => Bytes::new(),
        false => Bytes::from_static(content.as_bytes()),
    }));
    if fresh {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Any page may load the SDK (it is public code).
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, v);
    }
    resp
}

/// `/sdk/…`, or `None` for a path that is not an SDK file.
pub fn sdk(path: &str, request: &HeaderMap) -> Option<Response<Body>> {
    const JS: &str = "text/javascript; charset=utf-8";
    Some(match path {
        // Revalidated after five minutes: a new gateway version is picked up soon.
        "/sdk/roomcast.js" => file(request, SDK, JS, "public, max-age=300"),
        "/sdk/roomcast.d.ts" => file(request, SDK_TYPES, JS, "public, max-age=300"),
        p if p == versioned_sdk_path() => {
            file(request, SDK, JS, "public, max-age=31536000, immutable")
        }
        _ => return None,
    })
}

/// `/`: the demo page.
pub fn demo(gw: &Gateway, request: &HeaderMap) -> Response<Body> {
    if !gw.config.demo.enabled {
        return refuse(ErrorCode::NotFound, "the demo page is off (demo.enabled)");
    }
    let mut resp = file(request, DEMO, "text/html; charset=utf-8", "no-cache");
    resp.headers_mut()
        .remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:",
        ),
    );
    resp
}

/// `/demo/token?user=NAME`: a token for user NAME (with `info.name`),
/// signed with `auth.secret`, for `DEV_TOKEN_SECONDS`. Development only.
pub fn dev_token(gw: &Gateway, query: &str) -> Response<Body> {
    if !gw.config.demo.dev_tokens {
        return refuse(
            ErrorCode::NotFound,
            "development tokens are off (demo.dev_tokens)",
        );
    }
    let user = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let valid = (1..=32).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return refuse(
            ErrorCode::BadRequest,
            "user must be 1-32 characters of A-Z a-z 0-9 _ -",
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "sub": user,
        "exp": now + DEV_TOKEN_SECONDS,
        "info": {"name": user},
    });
    let key = jsonwebtoken::EncodingKey::from_secret(&gw.config.auth.key);
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    match jsonwebtoken::encode(&header, &claims, &key) {
        Ok(token) => {
            let body = serde_json::json!({"token": token, "expires_in": DEV_TOKEN_SECONDS});
            json_response(StatusCode::OK, body.to_string().into_bytes())
        }
        Err(e) => refuse(ErrorCode::BadRequest, &format!("cannot sign: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_sdk_says_the_version_it_is_served_as() {
        let line = format!("export const VERSION = '{SDK_VERSION}';");
        assert!(
            SDK.contains(&line),
            "clients/js/roomcast.js must say {line}"
        );
        let package = include_str!("../clients/js/package.json");
        assert!(
            package.contains(&format!("\"version\": \"{SDK_VERSION}\"")),
            "clients/js/package.json has the crate's version"
        );
    }

    #[test]
    fn an_sdk_request_with_the_current_etag_is_not_modified() {
        let none = HeaderMap::new();
        let first = sdk("/sdk/roomcast.js", &none).expect("served");
        assert_eq!(first.status(), StatusCode::OK);
        let tag = first.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        let second = sdk("/sdk/roomcast.js", &again).expect("served");
        assert_eq!(second.status(), StatusCode::NOT_MODIFIED);
        let versioned = sdk(versioned_sdk_path(), &none).expect("served");
        assert!(versioned.headers()[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable"));
        assert!(sdk("/sdk/other.js", &none).is_none());
    }
}
