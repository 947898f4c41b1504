//! Error numbers as users read them: `EADDRINUSE`, not 98.

use std::{borrow::Cow, fmt, str::FromStr, sync::LazyLock};

use portwatch_ebpf::ERRNO_UNKNOWN;
use serde::{Serialize, Serializer};

/// Error number of a failed bind or listen: positive as in `errno(3)`, or
/// [`Errno::UNKNOWN`] when the failure was seen but its code was not.
///
/// Displays and serializes as its symbolic name (`EADDRINUSE`), and parses
/// back from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

/// The largest error number the kernel can return (`MAX_ERRNO`): the names
/// table is built for 1 through this.
const MAX_ERRNO: i32 = 4095;

/// Symbolic names by number, from nix's table (which follows libc's), built
/// on first use. Index 0 is unused.
static ERRNO_NAMES: LazyLock<Vec<Option<String>>> = LazyLock::new(|| {
    (0..=MAX_ERRNO)
        .map(|n| match nix::errno::Errno::from_raw(n) {
            nix::errno::Errno::UnknownErrno => None,
            known => Some(format!("{known:?}")),
        })
        .collect()
});

/// Names glibc defines as aliases of another errno: accepted when parsing,
/// never printed.
const ERRNO_ALIASES: [(&str, i32); 3] = [
    ("EWOULDBLOCK", libc::EAGAIN),
    ("EDEADLOCK", libc::EDEADLK),
    ("ENOTSUP", libc::EOPNOTSUPP),
];

impl Errno {
    /// A failure whose error code no hook reported.
    pub const UNKNOWN: Errno = Errno(ERRNO_UNKNOWN);
    /// Address already in use.
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    /// Address not available on this host.
    pub const EADDRNOTAVAIL: Errno = Errno(libc::EADDRNOTAVAIL);
    /// Permission denied (privileged port, or a cgroup program refused).
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// Invalid argument (for example, the socket is already bound).
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Try again: a UDP socket's autobind found the range full.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);

    /// The symbolic name: `EADDRINUSE`, `UNKNOWN` for [`Errno::UNKNOWN`],
    /// `E<n>` for a number no table knows.
    pub fn name(self) -> Cow<'static, str> {
        if self == Self::UNKNOWN {
            return Cow::Borrowed("UNKNOWN");
        }
        let known = usize::try_from(self.0)
            .ok()
            .and_then(|n| ERRNO_NAMES.get(n))
            .and_then(|name| name.as_deref());
        match known {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!("E{}", self.0)),
        }
    }

    /// A short description, as `strerror(3)` gives it.
    pub fn description(self) -> &'static str {
        if self == Self::UNKNOWN {
            return "error code not reported";
        }
        match nix::errno::Errno::from_raw(self.0) {
            nix::errno::Errno::UnknownErrno => "unknown error",
            known => known.desc(),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

/// A string that is not an errno name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown errno name {0:?}")]
pub struct ParseErrnoError(pub String);

impl FromStr for Errno {
    type Err = ParseErrnoError;

    /// Parses what [`Errno::name`] prints, ignoring case: a symbolic name
    /// (`EADDRINUSE`, or a glibc alias such as `EWOULDBLOCK`), `UNKNOWN`,
    /// `E<n>`, or a bare number.
    fn from_str(s: &str) -> Result<Self, ParseErrnoError> {
        if s.eq_ignore_ascii_case("UNKNOWN") {
            return Ok(Self::UNKNOWN);
        }
        if let Some(n) = ERRNO_NAMES.iter().position(|name| {
            name.as_deref()
                .is_some_and(|name| name.eq_ignore_ascii_case(s))
        }) {
            // Index is at most MAX_ERRNO, so it fits.
            return Ok(Self(n as i32));
        }
        if let Some(&(_, n)) = ERRNO_ALIASES
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(s))
        {
            return Ok(Self(n));
        }
        let digits = match s.as_bytes().first() {
            Some(b'E' | b'e') => &s[1..],
            _ => s,
        };
        digits
            .parse()
            .map(Self)
            .map_err(|_| ParseErrnoError(s.to_owned()))
    }
}
