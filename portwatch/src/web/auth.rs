//! `basic_auth_users`: HTTP basic authentication against bcrypt hashes.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), so a right
//! answer is remembered. CVE-2022-46146 is what happens when that memory is
//! keyed by less than the whole secret: exporter-toolkit let a wrong
//! password in after a right one. Here the memory holds only an HMAC, under
//! a key made at start and never stored, of the user, the hash and the full
//! presented password together: a password that differs in any byte misses
//! it and goes to bcrypt, whose own comparison is constant-time, and the
//! memory is no fast digest anyone could guess passwords against. Wrong
//! answers are never remembered, so guessing stays as slow as bcrypt makes
//! it. At most one bcrypt check per CPU runs at once, each holding its slot
//! until bcrypt is done even if its client hangs up, and a request that
//! waits [`SLOT_WAIT`] for a slot is turned away: a flood of guesses can
//! neither take every thread nor queue without end.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    str::FromStr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::http::HeaderValue;
use base64::Engine as _;
use ring::hmac;
use tokio::sync::Semaphore;

/// How many right answers are remembered before the memory starts over.
const REMEMBERED: usize = 1024;

/// How long a request waits for a bcrypt slot before it is turned away.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);

/// Costs above this make every check slow enough to matter for the
/// daemon (about 1 s a check at 14 on a server CPU, doubling per step).
const SLOW_COST: u32 = 14;

/// The users of one web.yml, and the right answers already checked.
#[derive(Debug, Default)]
pub struct Users {
    hashes: HashMap<String, String>,
    /// Checked for a user that does not exist, at the configured users'
    /// highest cost, so that the time of a refusal does not tell which
    /// users exist.
    dummy: String,
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// What came of a request's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    Refused,
    /// No bcrypt slot came free in [`SLOT_WAIT`].
    Busy,
}

impl Users {
    /// The users from `basic_auth_users`: each hash must be a bcrypt hash
    /// (`Err` names the user whose is not). Makes the unknown users' hash,
    /// a bcrypt hash itself: call it off the async runtime.
    pub fn new(users: &BTreeMap<String, String>) -> Result<Users, (String, String)> {
        let mut cost = 0;
        for (user, hash) in users {
            let parts = bcrypt::HashParts::from_str(hash)
                .map_err(|err| (user.clone(), format!("not a bcrypt hash: {err}")))?;
            if user.is_empty() || user.contains(':') {
                return Err((
                    user.clone(),
                    "a user name must be non-empty and cannot contain ':'".into(),
                ));
            }
            if parts.get_cost() > SLOW_COST {
                tracing::warn!(
                    user,
                    cost = parts.get_cost(),
                    "a bcrypt cost above {SLOW_COST} makes every login of this user slow"
                );
            }
            cost = cost.max(parts.get_cost());
        }
        let dummy = if users.is_empty() {
            String::new()
        } else {
            bcrypt::hash("portwatch: no such user", cost)
                .map_err(|err| (String::new(), err.to_string()))?
        };
        Ok(Users {
            hashes: users.clone().into_iter().collect(),
            dummy,
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
    pub async fn admit(
        &self,
        authorization: Option<&HeaderValue>,
        checks: &Arc<Semaphore>,
    ) -> Admission {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return Admission::Refused;
        };
        let (known, hash) = match self.hashes.get(&user) {
            Some(hash) => (true, hash.clone()),
            None => (false, self.dummy.clone()),
        };
        let key = remembered_key(&user, &hash, &password);
        if known && self.remembered(&key) {
            return Admission::Admitted;
        }
        let permit = match tokio::time::timeout(SLOT_WAIT, checks.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Admission::Refused,
            Err(_) => return Admission::Busy,
        };
        // The slot goes with the check, not with this future: a client
        // that hangs up does not free it while bcrypt still runs.
        let right = tokio::task::spawn_blocking(move || {
            let right = bcrypt::verify(password, &hash).unwrap_or(false);
            drop(permit);
            right
        })
        .await
        .unwrap_or(false);
        if known && right {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.len() >= REMEMBERED {
                verified.clear();
            }
            verified.insert(key);
        }
        if known && right {
            Admission::Admitted
        } else {
            Admission::Refused
        }
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

/// The memory's key: an HMAC-SHA-256, under this process's own random key,
/// of every byte of the user, the hash and the password, length-prefixed so
/// that no two triples run together the same way.
fn remembered_key(user: &str, hash: &str, password: &str) -> [u8; 32] {
    static KEY: OnceLock<hmac::Key> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system's random source")
    });
    let mut mac = hmac::Context::with_key(key);
    for part in [user, hash, password] {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part.as_bytes());
    }
    mac.sign()
        .as_ref()
        .try_into()
        .expect("HMAC-SHA-256 is 32 bytes")
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

    async fn admits(users: &Users, header: Option<&HeaderValue>) -> bool {
        let slots = Arc::new(Semaphore::new(1));
        users.admit(header, &slots).await == Admission::Admitted
    }

    #[tokio::test]
    async fn a_wrong_password_after_a_right_one_is_refused() {
        let users = users("s3cret");
        assert!(admits(&users, Some(&basic("alice", "s3cret"))).await);
        // Remembered now; each of these differs from it in the secret only.
        for wrong in ["s3cre", "s3cret ", "s3creT", "", "s3cret\0"] {
            assert!(
                !admits(&users, Some(&basic("alice", wrong))).await,
                "{wrong:?}"
            );
        }
        assert!(admits(&users, Some(&basic("alice", "s3cret"))).await);
    }

    #[tokio::test]
    async fn unknown_users_and_bad_headers_are_refused() {
        let users = users("s3cret");
        assert!(!admits(&users, None).await);
        assert!(!admits(&users, Some(&basic("bob", "s3cret"))).await);
        for header in ["Bearer abc", "Basic !!!", "Basic", "Basic YWxpY2U="] {
            let header = HeaderValue::from_static(header);
            assert!(!admits(&users, Some(&header)).await, "{header:?}");
        }
        let lower = basic("alice", "s3cret")
            .to_str()
            .unwrap()
            .replace("Basic", "basic");
        assert!(admits(&users, Some(&HeaderValue::from_str(&lower).unwrap())).await);
    }

    #[tokio::test]
    async fn a_request_that_finds_no_bcrypt_slot_is_turned_away() {
        let users = users("s3cret");
        let none_free = Arc::new(Semaphore::new(0));
        let answer = users
            .admit(Some(&basic("alice", "s3cret")), &none_free)
            .await;
        assert_eq!(answer, Admission::Busy);
    }

    #[test]
    fn unknown_users_cost_what_known_ones_do() {
        let users = users("s3cret");
        let dummy = bcrypt::HashParts::from_str(&users.dummy).unwrap();
        assert_eq!(dummy.get_cost(), 4);
    }

    #[test]
    fn a_bad_hash_or_user_name_is_named() {
        let err = Users::new(&BTreeMap::from([("alice".into(), "plain".into())])).unwrap_err();
        assert_eq!(err.0, "alice");
        let hash = bcrypt::hash("x", 4).unwrap();
        for user in ["", "a:b"] {
            let err = Users::new(&BTreeMap::from([(user.into(), hash.clone())])).unwrap_err();
            assert_eq!(err.0, user);
        }
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
