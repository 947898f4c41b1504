//! `basic_auth_users`: HTTP basic authentication against bcrypt hashes.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), so a right
//! answer is remembered. CVE-2022-46146 is what happens when that memory is
//! keyed by less than the whole secret: exporter-toolkit let a wrong
//! password in after a right one. Here the memory holds only a SHA-256 of
//! the user, the hash and the full presented password together, so a
//! password that differs in any byte misses it and goes to bcrypt, whose
//! own comparison is constant-time. Wrong answers are never remembered, so
//! guessing stays as slow as bcrypt makes it; and at most one bcrypt check
//! per CPU runs at once, so a flood of guesses cannot take every thread.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    str::FromStr,
    sync::{Arc, Mutex, OnceLock},
};

use axum::http::HeaderValue;
use base64::Engine as _;
use tokio::sync::Semaphore;

/// How many right answers are remembered before the memory starts over.
const REMEMBERED: usize = 1024;

/// The users of one web.yml, and the right answers already checked.
#[derive(Debug, Default)]
pub struct Users {
    hashes: HashMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Users {
    /// The users from `basic_auth_users`: each hash must be a bcrypt hash
    /// (`Err` names the user whose is not).
    pub fn new(users: &BTreeMap<String, String>) -> Result<Users, (String, String)> {
        for (user, hash) in users {
            if let Err(err) = bcrypt::HashParts::from_str(hash) {
                return Err((user.clone(), format!("not a bcrypt hash: {err}")));
            }
            if user.contains(':') {
                return Err((user.clone(), "a user name cannot contain ':'".into()));
            }
        }
        Ok(Users {
            hashes: users.clone().into_iter().collect(),
            verified: Mutex::default(),
        })
    }

    /// How many users there are.
    pub fn count(&self) -> usize {
        self.hashes.len()
    }

    /// Whether any user is configured (else no request is checked).
    pub fn required(&self) -> bool {
        !self.hashes.is_empty()
    }

    /// Whether `authorization` (the request's header) names a user with
    /// the right password. `checks` bounds the bcrypt checks in progress.
    pub async fn admit(&self, authorization: Option<&HeaderValue>, checks: &Semaphore) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        // An unknown user costs a bcrypt check too, so timing does not tell
        // which users exist.
        let (known, hash) = match self.hashes.get(&user) {
            Some(hash) => (true, hash.clone()),
            None => (false, dummy_hash().to_owned()),
        };
        let key = remembered_key(&user, &hash, &password);
        if known && self.remembered(&key) {
            return true;
        }
        let Ok(_permit) = checks.acquire().await else {
            return false;
        };
        let right = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|verified| verified.unwrap_or(false));
        if known && right {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.len() >= REMEMBERED {
                verified.clear();
            }
            verified.insert(key);
        }
        known && right
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }
}

/// At most this many bcrypt checks at once: one per CPU.
pub fn bcrypt_slots() -> Arc<Semaphore> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    Arc::new(Semaphore::new(cpus))
}

/// The memory's key: every byte of the user, the hash and the password,
/// length-prefixed so that no two triples run together the same way.
fn remembered_key(user: &str, hash: &str, password: &str) -> [u8; 32] {
    let mut digest = ::ring::digest::Context::new(&::ring::digest::SHA256);
    for part in [user, hash, password] {
        digest.update(&(part.len() as u64).to_le_bytes());
        digest.update(part.as_bytes());
    }
    digest
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// A hash no password is expected to match, checked for unknown users.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        bcrypt::hash("portwatch: no such user", bcrypt::DEFAULT_COST)
            .expect("hashing a constant cannot fail")
    })
}

/// `Basic base64(user:password)` -> (user, password).
fn basic_credentials(header: &HeaderValue) -> Option<(String, String)> {
    let value = header.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap hash, so the tests do not spend seconds in bcrypt.
    fn users(password: &str) -> Users {
        let hash = bcrypt::hash(password, 4).unwrap();
        Users::new(&BTreeMap::from([("alice".to_owned(), hash)])).unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[tokio::test]
    async fn a_wrong_password_after_a_right_one_is_refused() {
        let users = users("s3cret");
        let slots = Semaphore::new(1);
        assert!(users.admit(Some(&basic("alice", "s3cret")), &slots).await);
        // Remembered now; each of these differs from it in the secret only.
        for wrong in ["s3cre", "s3cret ", "s3creT", "", "s3cret\0"] {
            assert!(
                !users.admit(Some(&basic("alice", wrong)), &slots).await,
                "{wrong:?}"
            );
        }
        assert!(users.admit(Some(&basic("alice", "s3cret")), &slots).await);
    }

    #[tokio::test]
    async fn unknown_users_and_bad_headers_are_refused() {
        let users = users("s3cret");
        let slots = Semaphore::new(1);
        assert!(!users.admit(None, &slots).await);
        assert!(!users.admit(Some(&basic("bob", "s3cret")), &slots).await);
        for header in ["Bearer abc", "Basic !!!", "Basic", "Basic YWxpY2U="] {
            let header = HeaderValue::from_static(header);
            assert!(!users.admit(Some(&header), &slots).await, "{header:?}");
        }
        let lower = basic("alice", "s3cret")
            .to_str()
            .unwrap()
            .replace("Basic", "basic");
        assert!(
            users
                .admit(Some(&HeaderValue::from_str(&lower).unwrap()), &slots)
                .await
        );
    }

    #[test]
    fn a_bad_hash_names_its_user() {
        let err = Users::new(&BTreeMap::from([("alice".into(), "plain".into())])).unwrap_err();
        assert_eq!(err.0, "alice");
        assert!(Users::new(&BTreeMap::new()).is_ok_and(|u| !u.required()));
    }

    #[test]
    fn the_key_covers_every_byte_of_each_part() {
        assert_ne!(
            remembered_key("a", "h", "p"),
            remembered_key("a", "h", "p2")
        );
        assert_ne!(
            remembered_key("ab", "h", "p"),
            remembered_key("a", "bh", "p")
        );
        assert_ne!(remembered_key("a", "h", "p"), remembered_key("b", "h", "p"));
    }
}
