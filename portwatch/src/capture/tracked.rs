//! The kernel's `TRACKED` set, from userspace: the sockets that existed
//! before portwatch started (found by a listing), whose release the kernel
//! programs must report although they never saw their bind.
//!
//! Why a batch: at start-up every listed socket is added before the daemon
//! is ready. One `BPF_MAP_UPDATE_ELEM` per socket was 100k system calls at
//! 100k listeners, about a third of the time to ready; one
//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6, every kernel portwatch runs on) does
//! them all in one. aya 0.14 has no batch operation, so this makes the one
//! call itself, on a duplicate of aya's map descriptor; single updates stay
//! aya's.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::maps::{HashMap, Map, MapData, MapError};

use super::CaptureError;

/// `BPF_MAP_UPDATE_BATCH` in `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (`include/uapi/linux/bpf.h`). The
/// kernel reads as many bytes as it is given and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The set of socket cookies the kernel tracks.
pub struct Tracked {
    map: HashMap<MapData, u64, u8>,
    /// The same map, for the batch call; `None` when the descriptor could
    /// not be duplicated (then every update is a single one).
    fd: Option<OwnedFd>,
}

/// The `TRACKED` map of a loaded object.
impl TryFrom<Map> for Tracked {
    type Error = MapError;

    fn try_from(map: Map) -> Result<Tracked, MapError> {
        let fd = match &map {
            Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned().ok(),
            _ => None,
        };
        Ok(Tracked {
            map: HashMap::try_from(map)?,
            fd,
        })
    }
}

impl Tracked {
    /// Tracks one socket.
    pub fn insert(&mut self, cookie: u64) -> Result<(), CaptureError> {
        self.map
            .insert(cookie, 1, 0)
            .map_err(|source| CaptureError::Map {
                name: "TRACKED",
                source,
            })
    }

    /// Tracks every socket of `cookies`; how many could not be (the set is
    /// full). One batch call, then one call per socket for whatever the
    /// batch did not take (a full map stops it; a kernel without batches
    /// refuses it whole).
    pub fn insert_all(&mut self, cookies: &[u64]) -> usize {
        let done = self.insert_batch(cookies).unwrap_or(0);
        cookies[done..]
            .iter()
            .filter(|cookie| self.insert(**cookie).is_err())
            .count()
    }

    /// Stops tracking one socket; a cookie the kernel already dropped is
    /// not an error.
    pub fn remove(&mut self, cookie: u64) {
        let _ = self.map.remove(&cookie);
    }

    /// How many of `cookies`, from the first, one batch call added.
    fn insert_batch(&self, cookies: &[u64]) -> io::Result<usize> {
        let Some(fd) = &self.fd else {
            return Ok(0);
        };
        let Ok(count) = u32::try_from(cookies.len()) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        if count == 0 {
            return Ok(0);
        }
        let values = vec![1u8; cookies.len()];
        let mut attr = BatchAttr {
            keys: cookies.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is the kernel's layout for this command; `keys`
        // and `values` point to `count` keys and values of the map's sizes
        // (u64, u8), alive for the call; the kernel writes only `count`.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        if result == 0 {
            return Ok(cookies.len());
        }
        let error = io::Error::last_os_error();
        added_before(count, attr.count, error.raw_os_error()).ok_or(error)
    }
}

/// How many of `asked` elements a failed batch added, from the `count` the
/// kernel left (`left`) and the error; `None` when it cannot be known. The
/// kernel writes the count back only once its loop ran, and the loop stops
/// at the element that failed, so a count below `asked` is the number added.
/// A count left at `asked` means it refused the call before the loop (no
/// batch support, EINVAL, EPERM): nothing was added. After EFAULT the count
/// is not to be trusted.
fn added_before(asked: u32, left: u32, errno: Option<i32>) -> Option<usize> {
    if errno == Some(libc::EFAULT) {
        return None;
    }
    Some(if left < asked { left as usize } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_counts_only_what_its_loop_added() {
        // A full map stopped it at the fourth element.
        assert_eq!(added_before(10, 3, Some(libc::E2BIG)), Some(3));
        // Refused before the loop: the count is the one given.
        assert_eq!(added_before(10, 10, Some(libc::EINVAL)), Some(0));
        assert_eq!(added_before(10, 10, Some(524)), Some(0), "ENOTSUPP");
        assert_eq!(added_before(10, 10, Some(libc::EPERM)), Some(0));
        // Not to be trusted.
        assert_eq!(added_before(10, 3, Some(libc::EFAULT)), None);
    }

    #[test]
    fn the_attribute_is_the_kernels_batch_member() {
        // `struct { in_batch, out_batch, keys, values; count, map_fd;
        // elem_flags, flags }` in union bpf_attr.
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }
}
