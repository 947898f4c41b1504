//! Root integration tests of the start-up snapshot: real sockets in a private
//! network namespace, made by a worker process in a private cgroup (or by
//! this process from a thread inside the namespace), found by
//! `portwatch::snapshot::take` with their namespace, state, options and
//! owners, and checked against `ss`.
//!
//! They need root (setns, pidfd_getfd, cgroups), so they are `#[ignore]`d
//! and `cargo xtask test` runs them (`--ignored`) where it can.

mod support;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Command, Stdio},
    time::Instant,
};

use portwatch::{
    snapshot::{self, Snapshot, SnapshotConfig, SnapshotSocket},
    socket::{Family, NetnsCookie, Protocol, SockState},
};
use support::{
    CgroupGuard, DEADLINE, NetnsGuard, Op, Worker,
    churn::{Listing, ss_listeners},
    serial,
};

fn sockets_in(snapshot: &Snapshot, netns: NetnsCookie) -> Vec<&SnapshotSocket> {
    snapshot
        .sockets
        .iter()
        .filter(|s| s.facts.netns == netns)
        .collect()
}

/// The listeners among `sockets` as `ss -tuln` counts them (TCP listening,
/// UDP bound), sorted.
fn snapshot_listeners(sockets: &[&SnapshotSocket]) -> Vec<Listing> {
    let mut listeners: Vec<Listing> = sockets
        .iter()
        .filter(|s| match s.facts.protocol {
            Protocol::Udp => s.facts.state == SockState::Bound,
            _ => s.facts.state == SockState::Listening,
        })
        .map(|s| (s.facts.protocol, s.facts.address, s.facts.port))
        .collect();
    listeners.sort_unstable();
    listeners
}

/// One socket the worker makes, and what the snapshot must say about it.
struct Expected {
    /// Socket number in the worker (creation order).
    sock: usize,
    protocol: Protocol,
    family: Family,
    address: IpAddr,
    port: u16,
    state: SockState,
    v6only: Option<bool>,
    reuse_addr: bool,
    reuse_port: bool,
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn snapshot_lists_a_private_netns_with_states_options_and_owners() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("snap");
    let netns = NetnsGuard::new("snap");
    let ops = [
        // 0: TCP 127.0.0.1:8000, listening.
        Op::tcp(false),
        Op::bind(0, "127.0.0.1:8000"),
        Op::listen(0),
        // 1: TCP [::]:8000 v6only, listening.
        Op::tcp(true),
        Op::v6only(1),
        Op::bind(1, "[::]:8000"),
        Op::listen(1),
        // 2: UDP 0.0.0.0:8000.
        Op::udp(false),
        Op::bind(2, "0.0.0.0:8000"),
        // 3: TCP bound, not listening.
        Op::tcp(false),
        Op::bind(3, "127.0.0.1:8001"),
        // 4, 5: an SO_REUSEPORT pair.
        Op::tcp(false),
        Op::reuseport(4),
        Op::bind(4, "127.0.0.1:8002"),
        Op::listen(4),
        Op::tcp(false),
        Op::reuseport(5),
        Op::bind(5, "127.0.0.1:8002"),
        Op::listen(5),
        // 6: UDP [::]:8003, dual-stack.
        Op::udp(true),
        Op::bind(6, "[::]:8003"),
        // 7: TCP with SO_REUSEADDR, listening.
        Op::tcp(false),
        Op::reuseaddr(7),
        Op::bind(7, "127.0.0.1:8004"),
        Op::listen(7),
        Op::Pause,
    ];
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let tcp4 = |sock, port, state, reuse_addr, reuse_port| Expected {
        sock,
        protocol: Protocol::Tcp,
        family: Family::Ipv4,
        address: v4(127, 0, 0, 1),
        port,
        state,
        v6only: None,
        reuse_addr,
        reuse_port,
    };
    let expected = [
        tcp4(0, 8000, SockState::Listening, false, false),
        Expected {
            sock: 1,
            protocol: Protocol::Tcp,
            family: Family::Ipv6,
            address: any6,
            port: 8000,
            state: SockState::Listening,
            v6only: Some(true),
            reuse_addr: false,
            reuse_port: false,
        },
        Expected {
            sock: 2,
            protocol: Protocol::Udp,
            family: Family::Ipv4,
            address: v4(0, 0, 0, 0),
            port: 8000,
            state: SockState::Bound,
            v6only: None,
            reuse_addr: false,
            reuse_port: false,
        },
        tcp4(3, 8001, SockState::Bound, false, false),
        tcp4(4, 8002, SockState::Listening, false, true),
        tcp4(5, 8002, SockState::Listening, false, true),
        Expected {
            sock: 6,
            protocol: Protocol::Udp,
            family: Family::Ipv6,
            address: any6,
            port: 8003,
            state: SockState::Bound,
            v6only: Some(false),
            reuse_addr: false,
            reuse_port: false,
        },
        tcp4(7, 8004, SockState::Listening, true, false),
    ];
    // A kernel before 6.7 cannot list a TCP socket that is only bound; the
    // probe the daemon trusts for that must agree with this real listing.
    let bound_listed = snapshot::bound_only_tcp_listed().expect("the sock_diag probe runs");
    println!("sock_diag lists bound-only TCP sockets: {bound_listed}");
    let expected: Vec<Expected> = expected
        .into_iter()
        .filter(|e| bound_listed || !(e.protocol == Protocol::Tcp && e.state == SockState::Bound))
        .collect();

    // The worker is forked from this thread, so it starts with its name.
    let comm = std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
    let comm = comm.trim_end();
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert!(results.iter().all(|&r| r >= 0), "ops failed: {results:?}");
    // Socket number -> fd in the worker.
    let fds: Vec<i32> = ops
        .iter()
        .zip(&results)
        .filter(|(op, _)| matches!(op, Op::Socket { .. }))
        .map(|(_, &fd)| fd as i32)
        .collect();

    let host = snapshot::netns_cookie_of_current_thread().expect("host cookie");
    let private = netns.cookie();
    assert_ne!(private, host);

    let snap = snapshot::take(&SnapshotConfig::default()).expect("snapshot");
    eprintln!(
        "snapshot: {} sockets in {} namespaces in {:?} ({} skipped, {} with unknown options)",
        snap.sockets.len(),
        snap.namespaces.len(),
        snap.elapsed,
        snap.skipped_netns.len(),
        snap.options_unreadable
    );

    // The namespaces: ours by name and cookie, the host's too.
    let ours = snap
        .namespaces
        .iter()
        .find(|ns| ns.names.contains(&netns.name))
        .unwrap_or_else(|| panic!("{} not listed: {:?}", netns.name, snap.namespaces));
    assert_eq!(ours.cookie, private);
    assert!(snap.namespaces.iter().any(|ns| ns.cookie == host));
    let cookies: HashSet<NetnsCookie> = snap.namespaces.iter().map(|ns| ns.cookie).collect();
    assert_eq!(cookies.len(), snap.namespaces.len(), "each namespace once");

    // Exactly the worker's sockets in the private namespace, nothing else.
    let inside = sockets_in(&snap, private);
    assert_eq!(
        inside.len(),
        expected.len(),
        "sockets in the private netns: {inside:#?}"
    );
    for socket in &snap.sockets {
        if socket.owners.iter().any(|o| o.pid == worker.pid) {
            assert_eq!(
                socket.facts.netns, private,
                "worker socket outside: {socket:?}"
            );
        }
    }
    let cgroup_name = cgroup
        .path
        .file_name()
        .expect("cgroup name")
        .to_string_lossy();
    for want in &expected {
        let fd = fds[want.sock];
        let found = inside
            .iter()
            .find(|s| s.owners.iter().any(|o| o.fd == fd))
            .unwrap_or_else(|| panic!("socket {} (fd {fd}) not found: {inside:#?}", want.sock));
        let facts = &found.facts;
        let what = format!("socket {}: {found:?}", want.sock);
        assert_eq!(facts.protocol, want.protocol, "{what}");
        assert_eq!(facts.family, want.family, "{what}");
        assert_eq!(facts.address, want.address, "{what}");
        assert_eq!(facts.port, want.port, "{what}");
        assert_eq!(facts.state, want.state, "{what}");
        assert_eq!(facts.options.v6only, want.v6only, "{what}");
        assert_eq!(facts.options.reuse_addr, Some(want.reuse_addr), "{what}");
        assert_eq!(facts.options.reuse_port, Some(want.reuse_port), "{what}");
        assert_eq!(facts.uid, Some(0), "{what}");
        assert_eq!(facts.bound_dev_if, 0, "{what}");
        assert_ne!(facts.cookie, 0, "{what}");
        assert_ne!(found.inode, 0, "{what}");
        assert_eq!(found.owners.len(), 1, "{what}");
        let owner = &found.owners[0];
        assert_eq!(owner.pid, worker.pid, "{what}");
        let (info, place) = (&owner.info, &owner.info.place);
        assert_eq!(info.process, comm, "{what}");
        assert_eq!(info.uid, 0, "{what}");
        let cgroup = place.cgroup.as_deref().unwrap_or_default();
        assert!(cgroup.ends_with(&*cgroup_name), "{what}: {cgroup}");
        assert_eq!((&place.unit, &place.container), (&None, &None), "{what}");
    }
    let distinct: HashSet<u64> = inside.iter().map(|s| s.facts.cookie).collect();
    assert_eq!(distinct.len(), inside.len(), "one cookie per socket");

    // The same listeners as ss shows for that namespace, UDP included.
    assert_eq!(snapshot_listeners(&inside), ss_listeners(&netns));

    // Without option reads, options stay unknown rather than guessed.
    let quick = snapshot::take(&SnapshotConfig {
        read_owners: true,
        read_options: false,
        holders_only: false,
    })
    .expect("snapshot without options");
    let inside = sockets_in(&quick, private);
    assert_eq!(inside.len(), expected.len());
    for socket in inside {
        assert_eq!(socket.facts.options.reuse_addr, None, "{socket:?}");
        assert_eq!(socket.facts.options.reuse_port, None, "{socket:?}");
        assert_eq!(socket.owners.len(), 1, "{socket:?}");
    }

    worker.resume();
    assert_eq!(worker.wait(), 0, "worker exit status");
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn a_socket_held_by_two_processes_lists_both() {
    let _serial = serial();
    let netns = NetnsGuard::new("shared");
    let private = netns.cookie();
    let listener = netns.run_in(|| TcpListener::bind("127.0.0.1:8080").expect("bind"));
    let fd = listener.as_raw_fd();
    // A child inherits it, as with systemd socket activation or a fork.
    let mut command = Command::new("sleep");
    command.arg("60").stdin(Stdio::null());
    // SAFETY: fcntl is async-signal-safe; it clears FD_CLOEXEC in the
    // child's copy of the descriptor table only.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command.spawn().expect("spawn sleep");
    let child_pid = child.id();
    let deadline = Instant::now() + *DEADLINE;
    while std::fs::read_to_string(format!("/proc/{child_pid}/comm"))
        .ok()
        .as_deref()
        != Some("sleep\n")
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::yield_now();
    }

    let snap = snapshot::take(&SnapshotConfig::default()).expect("snapshot");
    let _ = child.kill();
    let _ = child.wait();

    let inside = sockets_in(&snap, private);
    assert_eq!(inside.len(), 1, "{inside:#?}");
    let socket = inside[0];
    assert_eq!(socket.facts.state, SockState::Listening);
    assert_eq!(socket.facts.port, 8080);
    // std's TcpListener sets SO_REUSEADDR.
    assert_eq!(socket.facts.options.reuse_addr, Some(true));
    assert_eq!(socket.facts.options.reuse_port, Some(false));
    let holders: Vec<(u32, i32)> = socket.owners.iter().map(|o| (o.pid, o.fd)).collect();
    let mut want = vec![(std::process::id(), fd), (child_pid, fd)];
    want.sort_unstable();
    assert_eq!(holders, want);
    let child_owner = socket
        .owners
        .iter()
        .find(|o| o.pid == child_pid)
        .expect("child");
    assert_eq!(child_owner.info.process, "sleep");
    drop(listener);
}

/// Listeners for the scale test: `PORTWATCH_SNAPSHOT_LISTENERS` or 10,000.
fn listener_count() -> usize {
    std::env::var("PORTWATCH_SNAPSHOT_LISTENERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// Listeners per holder process: below the usual 20,000 descriptor limit,
/// which this test may not be allowed to raise.
const PER_HOLDER: usize = 15_000;

/// `sleep` processes holding inherited listeners, killed on drop.
struct Holders(Vec<std::process::Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Hands `listeners` to a new `sleep` process, which inherits them at the
/// same descriptor numbers; returns its pid and those numbers.
fn hand_over(listeners: Vec<TcpListener>, holders: &mut Holders) -> (u32, Vec<i32>) {
    let fds: Vec<i32> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let inherit = fds.clone();
    let mut command = Command::new("sleep");
    command.arg("600").stdin(Stdio::null());
    // SAFETY: fcntl is async-signal-safe; it clears FD_CLOEXEC in the
    // child's copy of the descriptor table only.
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn holder");
    let pid = child.id();
    holders.0.push(child);
    // The child has exec'd (spawn waits for it) and holds its own copies.
    drop(listeners);
    (pid, fds)
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn snapshot_finds_every_one_of_many_listeners() {
    let _serial = serial();
    let count = listener_count();
    let netns = NetnsGuard::new("many");
    let private = netns.cookie();
    let mut holders = Holders(Vec::new());
    let mut held: HashSet<(u32, i32)> = HashSet::new();
    let mut made = 0;
    while made < count {
        let batch = PER_HOLDER.min(count - made);
        let listeners: Vec<TcpListener> = netns.run_in(|| {
            (made..made + batch)
                .map(|i| {
                    // 127.0.0.0/8 is all local: spread over addresses.
                    let address = Ipv4Addr::new(127, 1 + (i / 50_000) as u8, 0, 1);
                    let port = 10_000 + (i % 50_000) as u16;
                    TcpListener::bind((address, port)).expect("bind listener")
                })
                .collect()
        });
        let (pid, fds) = hand_over(listeners, &mut holders);
        held.extend(fds.into_iter().map(|fd| (pid, fd)));
        made += batch;
    }

    let started = Instant::now();
    let listing = snapshot::take(&SnapshotConfig {
        read_owners: false,
        read_options: false,
        holders_only: false,
    })
    .expect("listing");
    let listing_time = started.elapsed();
    let started = Instant::now();
    let owners_only = snapshot::take(&SnapshotConfig {
        read_owners: true,
        read_options: false,
        holders_only: false,
    })
    .expect("listing with owners");
    let owners_time = started.elapsed();
    let started = Instant::now();
    let full = snapshot::take(&SnapshotConfig::default()).expect("snapshot");
    let full_time = started.elapsed();
    let started = Instant::now();
    let ss = ss_listeners(&netns);
    let ss_time = started.elapsed();
    let started = Instant::now();
    let with_processes = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ss", "-tlnpH"])
        .stdout(Stdio::null())
        .status()
        .expect("ss -p");
    assert!(with_processes.success());
    let ss_processes_time = started.elapsed();
    eprintln!(
        "{count} listeners: listing {listing_time:?}, + owners {owners_time:?}, \
         + options {full_time:?} ({:?}); `ip netns exec .. ss -tulnH` {ss_time:?}, \
         `ss -tlnpH` {ss_processes_time:?}",
        full.phases
    );

    assert_eq!(sockets_in(&listing, private).len(), count);
    assert_eq!(sockets_in(&owners_only, private).len(), count);
    let inside = sockets_in(&full, private);
    assert_eq!(inside.len(), count);
    assert_eq!(snapshot_listeners(&inside), ss);
    let mut seen = HashSet::new();
    for socket in &inside {
        assert_eq!(socket.facts.state, SockState::Listening);
        // std's TcpListener sets SO_REUSEADDR.
        assert_eq!(socket.facts.options.reuse_addr, Some(true), "{socket:?}");
        assert_eq!(socket.facts.options.reuse_port, Some(false), "{socket:?}");
        assert_eq!(socket.owners.len(), 1, "{socket:?}");
        let owner = &socket.owners[0];
        assert_eq!(owner.info.process, "sleep");
        assert!(held.contains(&(owner.pid, owner.fd)), "{socket:?}");
        assert!(seen.insert((owner.pid, owner.fd)), "two sockets, one fd");
    }
    drop(holders);
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn holders_only_lists_listeners_and_bound_sockets_but_no_connections() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("holders");
    let netns = NetnsGuard::new("holders");
    let addr: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let ops = [
        // 0: a TCP listener; 1: a client connected to it; 2: the accepted end.
        Op::tcp(false),
        Op::bind(0, "127.0.0.1:9000"),
        Op::Listen {
            sock: 0,
            backlog: 4,
        },
        Op::tcp(false),
        Op::Connect { sock: 1, addr },
        Op::Accept { sock: 0 },
        // 3: a bound UDP socket; 4: a connected one.
        Op::udp(false),
        Op::bind(3, "127.0.0.1:9001"),
        Op::udp(false),
        Op::Connect {
            sock: 4,
            addr: "127.0.0.1:9001".parse().unwrap(),
        },
        Op::Pause,
    ];
    let mut worker = Worker::spawn(&cgroup.path, Some(&netns), &ops);
    let results = worker.results(ops.len() - 1);
    assert!(results.iter().all(|&r| r >= 0), "ops failed: {results:?}");

    let private = netns.cookie();
    let config = |holders_only| SnapshotConfig {
        holders_only,
        ..SnapshotConfig::default()
    };
    let full = snapshot::take(&config(false)).expect("full snapshot");
    let holders = snapshot::take(&config(true)).expect("holders-only snapshot");
    let states = |snap: &Snapshot| {
        let mut seen: Vec<(Protocol, SockState, usize)> = sockets_in(snap, private)
            .iter()
            .map(|s| (s.facts.protocol, s.facts.state, s.owners.len()))
            .collect();
        seen.sort_by_key(|&(protocol, state, _)| (protocol, state as u8));
        seen
    };
    let full_states = states(&full);
    assert_eq!(full_states.len(), 5, "{full_states:?}");
    // Exactly the full listing's listening and bound sockets, owners and all.
    let expected: Vec<_> = full_states
        .iter()
        .copied()
        .filter(|(_, state, _)| state.is_listening_or_bound())
        .collect();
    assert_eq!(expected.len(), 2, "{full_states:?}");
    assert_eq!(states(&holders), expected);
    assert!(expected.iter().all(|&(_, _, owners)| owners == 1));

    worker.resume();
    assert_eq!(worker.wait(), 0, "worker exit status");
}
