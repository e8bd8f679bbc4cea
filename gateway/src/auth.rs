//! Tenant tokens: HS256 JWTs with the claims of [`clickpulse_protocol::auth::Claims`].
//!
//! Only HS256 is accepted (no algorithm from the token is trusted), `exp` is required and
//! checked with no leeway, and the tenant claim must be a valid tenant name.

use clickpulse_protocol::Tenant;
use clickpulse_protocol::auth::Claims;
use clickpulse_protocol::zk::Right;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// Shortest secret accepted: HS256 keys shorter than the hash are weak.
pub const MIN_SECRET_LEN: usize = 32;

/// Why a token was refused. Shown to operators in logs and counted; the client only sees 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token lacks the {0:?} right")]
    MissingRight(Right),
}

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token secret must be at least {MIN_SECRET_LEN} bytes, not {0}")]
pub struct WeakSecret(pub usize);

/// Signs and checks tokens with one shared secret.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<secret>)")
    }
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Result<Self, WeakSecret> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(WeakSecret(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        Ok(TokenKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// A token for `tenant`, valid `ttl_secs` from `now_secs`.
    pub fn mint(
        &self,
        tenant: &Tenant,
        subject: &str,
        rights: &[Right],
        now_secs: i64,
        ttl_secs: i64,
    ) -> String {
        let claims = Claims {
            tenant: tenant.clone(),
            sub: subject.to_owned(),
            rights: rights.to_vec(),
            iat: now_secs,
            exp: now_secs.saturating_add(ttl_secs),
        };
        // Encoding plain claims with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                other => AuthError::Malformed(format!("{other:?}")),
            })
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> TokenKey {
        TokenKey::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let acme = Tenant::new("acme").unwrap();
        let token = key(1).mint(&acme, "alice", &[Right::View], now_secs(), 60);
        let claims = key(1).verify(&token).unwrap();
        assert_eq!(claims.tenant, acme);
        assert_eq!(claims.sub, "alice");
        assert!(claims.has(Right::View) && !claims.has(Right::Admin));
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let acme = Tenant::new("acme").unwrap();
        let other_key = key(2).mint(&acme, "x", &[Right::View], now_secs(), 60);
        assert_eq!(key(1).verify(&other_key), Err(AuthError::BadSignature));
        let expired = key(1).mint(&acme, "x", &[Right::View], now_secs() - 100, 10);
        assert_eq!(key(1).verify(&expired), Err(AuthError::Expired));
        assert_eq!(key(1).verify(""), Err(AuthError::Missing));
        assert!(matches!(
            key(1).verify("not.a.jwt"),
            Err(AuthError::Malformed(_))
        ));
        // A token that says "alg: none" is never trusted.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ0ZW5hbnQiOiJhY21lIiwic3ViIjoieCIsInJpZ2h0cyI6WyJ2aWV3Il0sImlhdCI6MCwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(key(1).verify(none).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(TokenKey::new(b"short").err(), Some(WeakSecret(5)));
    }
}
