//! SO_REUSEADDR and SO_REUSEPORT of sockets that existed before portwatch.
//! sock_diag does not report them, so a copy of an owner's descriptor is
//! taken (`pidfd_getfd`, Linux 5.6) and asked with `getsockopt`, then closed.
//!
//! `pidfd_getfd` needs ptrace access to the owner (PTRACE_MODE_ATTACH_REALCREDS:
//! root has it unless Yama's ptrace_scope is 3). Where it is refused, the
//! owner is gone or the descriptor now names another file, the options stay
//! unknown. Copying a descriptor does not change the socket; the copy only
//! keeps it alive until it is closed a few system calls later.

use std::{
    collections::HashMap,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// What was read from one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ShareFlags {
    pub reuse_addr: bool,
    pub reuse_port: bool,
}

/// Reads options through pidfds, opening one per owner process.
#[derive(Default)]
pub(crate) struct OptionReader {
    /// `None`: the process could not be opened (gone, or not permitted).
    pidfds: HashMap<u32, Option<OwnedFd>>,
}

impl OptionReader {
    /// Reads the options of the socket with cookie `cookie` through the
    /// first of its holders `(pid, fd)` that lets us.
    pub fn read(
        &mut self,
        holders: impl IntoIterator<Item = (u32, i32)>,
        cookie: u64,
    ) -> Option<ShareFlags> {
        for (pid, fd) in holders {
            let Some(pidfd) = self
                .pidfds
                .entry(pid)
                .or_insert_with(|| pidfd_open(pid).ok())
            else {
                continue;
            };
            let Ok(copy) = pidfd_getfd(pidfd.as_raw_fd(), fd) else {
                continue;
            };
            // The holder may have closed the descriptor and reused the
            // number since the fd scan: the cookie says it is the same socket.
            if socket_option::<u64>(&copy, libc::SO_COOKIE).ok() != Some(cookie) {
                continue;
            }
            let (Ok(reuse_addr), Ok(reuse_port)) = (
                socket_option::<libc::c_int>(&copy, libc::SO_REUSEADDR),
                socket_option::<libc::c_int>(&copy, libc::SO_REUSEPORT),
            ) else {
                continue;
            };
            return Some(ShareFlags {
                reuse_addr: reuse_addr != 0,
                reuse_port: reuse_port != 0,
            });
        }
        None
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open(pid, flags) takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned(fd)
}

fn pidfd_getfd(pidfd: RawFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(pidfd, targetfd, flags) takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) };
    owned(fd)
}

/// A system call's new descriptor (O_CLOEXEC is set by both calls above).
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An integer SOL_SOCKET option (`c_int` flags, the u64 cookies).
pub(super) fn socket_option<T: Default + Copy>(
    socket: impl AsFd,
    name: libc::c_int,
) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, and only
    // integers are asked for (any bit pattern is valid).
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    /// A process may always copy its own descriptors, root or not.
    #[test]
    fn reads_options_of_our_own_socket() {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let cookie = socket_option::<u64>(
            &OwnedFd::from(socket.try_clone().expect("dup")),
            libc::SO_COOKIE,
        )
        .expect("SO_COOKIE");
        let mut reader = OptionReader::default();
        let holders = [(std::process::id(), socket.as_raw_fd())];
        assert_eq!(
            reader.read(holders, cookie),
            Some(ShareFlags {
                reuse_addr: false,
                reuse_port: false
            })
        );
        assert_eq!(
            reader.read(holders, cookie + 1),
            None,
            "another socket is never guessed"
        );
        assert_eq!(
            reader.read([(u32::MAX, 3)], cookie),
            None,
            "no such process"
        );
    }
}
