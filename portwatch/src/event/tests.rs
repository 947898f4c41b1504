use std::{
    mem::offset_of,
    time::{Duration, SystemTime},
};

use portwatch_ebpf::{AF_INET, AF_INET6, ERRNO_UNKNOWN, kind, port_alloc, source};
use proptest::prelude::*;

use super::{clock::clock_ns, *};

const SIZE: usize = size_of::<RawEvent>();

/// Records of random bytes whose enum-like fields hold known values, so
/// most of them decode (shared with the formatting tests).
pub(crate) fn valid_record() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), SIZE),
        1..=7u8,
        prop::sample::select(vec![AF_INET, AF_INET6]),
        prop::sample::select(vec![6u16, 17, 136, 132, 262]),
        prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 10]),
        1..=6u8,
        0..=2u8,
    )
        .prop_map(
            |(mut bytes, kind, family, protocol, sock_type, source, alloc)| {
                bytes[offset_of!(RawEvent, kind)] = kind;
                bytes[offset_of!(RawEvent, port_alloc)] = alloc;
                bytes[offset_of!(RawEvent, sock_type)] = sock_type;
                bytes[offset_of!(RawEvent, source)] = source;
                let family_at = offset_of!(RawEvent, family);
                bytes[family_at..family_at + 2].copy_from_slice(&family.to_ne_bytes());
                let protocol_at = offset_of!(RawEvent, protocol);
                bytes[protocol_at..protocol_at + 2].copy_from_slice(&protocol.to_ne_bytes());
                bytes
            },
        )
}

/// The record's bytes, as the ring buffer would hand them over.
fn bytes_of(raw: &RawEvent) -> Vec<u8> {
    // SAFETY: `RawEvent` is `#[repr(C)]` plain data with explicit padding
    // fields, so all `SIZE` bytes behind the reference are initialized.
    unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), SIZE) }.to_vec()
}

fn comm(name: &[u8]) -> [u8; 16] {
    let mut comm = [0; 16];
    comm[..name.len()].copy_from_slice(name);
    comm
}

/// A successful IPv4 TCP bind of 127.0.0.1:8000.
fn bind_v4() -> RawEvent {
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    RawEvent {
        ts_ns: 1_000_000_123,
        cookie: 4242,
        netns_cookie: 4096,
        cgroup_id: 77,
        pid: 1234,
        tid: 1235,
        uid: 1000,
        sock_uid: 1000,
        errno: 0,
        family: AF_INET,
        port: 8000,
        bound_port: 8000,
        protocol: 6,
        kind: kind::BIND,
        sock_type: 1,
        source: source::POST_BIND,
        addr,
        comm: comm(b"nginx"),
        ..RawEvent::ZERO
    }
}

/// An IPv6 UDP bind of [::1]:5353.
fn bind_v6() -> RawEvent {
    RawEvent {
        family: AF_INET6,
        protocol: 17,
        sock_type: 2,
        port: 5353,
        bound_port: 5353,
        addr: Ipv6Addr::LOCALHOST.octets(),
        ..bind_v4()
    }
}

fn decoded(raw: RawEvent) -> PortEvent {
    decode(&bytes_of(&raw)).expect("valid record")
}

#[test]
fn size_is_the_wire_size() {
    assert_eq!(SIZE, 128);
}

#[test]
fn decodes_an_ipv4_bind() {
    let ev = decoded(bind_v4());
    assert_eq!(
        ev,
        PortEvent {
            kind: EventKind::Bind,
            boot_ns: 1_000_000_123,
            pid: 1234,
            tid: 1235,
            uid: 1000,
            sock_uid: Some(1000),
            process: "nginx".into(),
            cgroup_id: 77,
            netns: Some(4096),
            cookie: Some(4242),
            protocol: Protocol::Tcp,
            family: Family::Ipv4,
            sock_type: SockType::Stream,
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8000,
            bound_port: Some(8000),
            errno: None,
            options: Options::default(),
            backlog: None,
            source: Source::PostBind,
            port_alloc: None,
            peer: None,
        }
    );
    assert_eq!(ev.endpoint(), "127.0.0.1:8000");
}

#[test]
fn decodes_an_ipv6_bind() {
    let ev = decoded(bind_v6());
    assert_eq!(ev.family, Family::Ipv6);
    assert_eq!(ev.protocol, Protocol::Udp);
    assert_eq!(ev.sock_type, SockType::Dgram);
    assert_eq!(ev.address, IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(ev.endpoint(), "[::1]:5353");
}

#[test]
fn ipv4_reads_only_the_first_four_bytes_in_network_order() {
    let mut raw = bind_v4();
    raw.addr = [10, 1, 2, 3, 0xff, 0xff, 0xff, 0xff, 9, 9, 9, 9, 9, 9, 9, 9];
    assert_eq!(decoded(raw).address, "10.1.2.3".parse::<IpAddr>().unwrap());
}

#[test]
fn decodes_every_kind() {
    let cases = [
        (kind::BIND, 0, EventKind::Bind),
        (kind::BIND, 98, EventKind::BindFailed),
        (kind::BIND, ERRNO_UNKNOWN, EventKind::BindFailed),
        (kind::LISTEN, 0, EventKind::Listen),
        (kind::LISTEN_FAILED, 98, EventKind::ListenFailed),
        (kind::LISTEN_STOP, 0, EventKind::ListenStop),
        (kind::CLOSE, 0, EventKind::Close),
    ];
    for (raw_kind, errno, want) in cases {
        let raw = RawEvent {
            kind: raw_kind,
            errno,
            ..bind_v4()
        };
        let ev = decoded(raw);
        assert_eq!(ev.kind, want, "kind {raw_kind} errno {errno}");
        assert_eq!(ev.errno.is_some(), want.is_failure(), "{want}");
    }
}

#[test]
fn decodes_a_close_record_as_the_release_hook_fills_it() {
    let raw = RawEvent {
        kind: kind::CLOSE,
        source: source::RELEASE,
        family: AF_INET6,
        protocol: 6,
        sock_type: 1,
        cookie: 99,
        comm: comm(b"python3"),
        ..RawEvent::ZERO
    };
    let ev = decoded(raw);
    assert_eq!(ev.kind, EventKind::Close);
    assert_eq!(ev.source, Source::Release);
    assert_eq!(ev.cookie, Some(99));
    assert_eq!(ev.address, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    assert_eq!(ev.bound_port, None);
    assert_eq!(ev.sock_uid, None);
    assert_eq!(ev.netns, None);
    assert_eq!(ev.options, Options::default());
}

#[test]
fn a_failed_bind_keeps_its_errno() {
    let raw = RawEvent {
        errno: 98,
        bound_port: 0,
        source: source::FEXIT,
        ..bind_v4()
    };
    let ev = decoded(raw);
    assert_eq!(ev.kind, EventKind::BindFailed);
    assert_eq!(ev.errno, Some(Errno::EADDRINUSE));
    assert_eq!(ev.bound_port, None);
    assert_eq!(ev.source, Source::Fexit);
}

#[test]
fn a_listen_failure_without_a_code_is_unknown_not_success() {
    let raw = RawEvent {
        kind: kind::LISTEN_FAILED,
        errno: 0,
        ..bind_v4()
    };
    assert_eq!(decoded(raw).errno, Some(Errno::UNKNOWN));
}

#[test]
fn backlog_only_for_listen_kinds() {
    let listen = RawEvent {
        kind: kind::LISTEN,
        backlog: 4096,
        source: source::FEXIT,
        ..bind_v4()
    };
    assert_eq!(decoded(listen).backlog, Some(4096));
    let unknown = RawEvent {
        backlog: 0,
        ..listen
    };
    assert_eq!(decoded(unknown).backlog, None);
    let bind = RawEvent {
        backlog: 4096,
        ..bind_v4()
    };
    assert_eq!(decoded(bind).backlog, None);
}

#[test]
fn every_source_decodes() {
    let cases = [
        (source::POST_BIND, Source::PostBind),
        (source::SYSCALL_EXIT, Source::SyscallExit),
        (source::FEXIT, Source::Fexit),
        (source::STATE, Source::State),
        (source::RELEASE, Source::Release),
        (source::UNRESOLVED, Source::Unresolved),
        (source::DESTROY, Source::Destroy),
    ];
    for (raw, want) in cases {
        assert_eq!(
            decoded(RawEvent {
                source: raw,
                ..bind_v4()
            })
            .source,
            want
        );
    }
}

#[test]
fn every_port_alloc_verdict_decodes() {
    let cases = [
        (port_alloc::NOT_SEEN, None),
        (port_alloc::ALLOCATED, Some(PortAlloc::Allocated)),
        (port_alloc::REFUSED, Some(PortAlloc::Refused)),
    ];
    for (raw, want) in cases {
        assert_eq!(
            decoded(RawEvent {
                port_alloc: raw,
                ..bind_v4()
            })
            .port_alloc,
            want
        );
    }
}

#[test]
fn every_protocol_decodes() {
    let cases = [
        (6, Protocol::Tcp),
        (17, Protocol::Udp),
        (136, Protocol::UdpLite),
        (132, Protocol::Sctp),
        (262, Protocol::Mptcp),
    ];
    for (number, want) in cases {
        let raw = RawEvent {
            protocol: number,
            ..bind_v4()
        };
        assert_eq!(decoded(raw).protocol, want);
        assert_eq!(want.number(), number);
    }
}

#[test]
fn wrong_lengths_are_rejected() {
    let good = bytes_of(&bind_v4());
    for len in [0, 1, 50, 127] {
        assert_eq!(
            decode(&good[..len]),
            Err(DecodeError::Length {
                expected: 128,
                actual: len
            })
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        decode(&long),
        Err(DecodeError::Length {
            expected: 128,
            actual: 129
        })
    );
}

#[test]
fn decodes_from_an_unaligned_slice() {
    let mut buf = vec![0u8; 1];
    buf.extend(bytes_of(&bind_v4()));
    assert_eq!(decode(&buf[1..]), Ok(decoded(bind_v4())));
}

#[test]
fn unknown_values_name_the_field() {
    let raw = bind_v4();
    let cases = [
        (RawEvent { kind: 0, ..raw }, DecodeError::Kind(0)),
        (RawEvent { kind: 8, ..raw }, DecodeError::Kind(8)),
        (RawEvent { family: 0, ..raw }, DecodeError::Family(0)),
        (RawEvent { family: 1, ..raw }, DecodeError::Family(1)),
        (RawEvent { protocol: 0, ..raw }, DecodeError::Protocol(0)),
        (RawEvent { protocol: 1, ..raw }, DecodeError::Protocol(1)),
        (
            RawEvent {
                sock_type: 0,
                ..raw
            },
            DecodeError::SockType(0),
        ),
        (RawEvent { source: 0, ..raw }, DecodeError::Source(0)),
        (RawEvent { source: 8, ..raw }, DecodeError::Source(8)),
        (
            RawEvent {
                port_alloc: 3,
                ..raw
            },
            DecodeError::PortAlloc(3),
        ),
    ];
    for (bad, want) in cases {
        assert_eq!(decode(&bytes_of(&bad)), Err(want));
    }
    assert_eq!(
        DecodeError::Protocol(1).to_string(),
        "unknown ip protocol 1"
    );
    assert_eq!(
        DecodeError::Length {
            expected: 128,
            actual: 50
        }
        .to_string(),
        "record is 50 bytes, expected 128"
    );
}

#[test]
fn errno_names() {
    let cases = [
        (98, "EADDRINUSE"),
        (99, "EADDRNOTAVAIL"),
        (13, "EACCES"),
        (1, "EPERM"),
        (22, "EINVAL"),
        (105, "ENOBUFS"),
        (12, "ENOMEM"),
        (97, "EAFNOSUPPORT"),
        (95, "EOPNOTSUPP"),
        (106, "EISCONN"),
        (9, "EBADF"),
        (88, "ENOTSOCK"),
        (14, "EFAULT"),
        (107, "ENOTCONN"),
        (89, "EDESTADDRREQ"),
        (-1, "UNKNOWN"),
        (4242, "E4242"),
        (0, "E0"),
        (-5, "E-5"),
    ];
    for (n, name) in cases {
        assert_eq!(Errno(n).name(), name, "errno {n}");
        assert_eq!(Errno(n).to_string(), name);
        assert_eq!(name.parse::<Errno>(), Ok(Errno(n)), "{name}");
    }
    assert_eq!(Errno::UNKNOWN, Errno(-1));
    assert_eq!(Errno::EADDRINUSE.description(), "Address already in use");
}

#[test]
fn errno_parsing() {
    assert_eq!("eaddrinuse".parse(), Ok(Errno::EADDRINUSE));
    assert_eq!("EAddrInUse".parse(), Ok(Errno::EADDRINUSE));
    assert_eq!("unknown".parse(), Ok(Errno::UNKNOWN));
    assert_eq!("98".parse(), Ok(Errno::EADDRINUSE));
    assert_eq!("E98".parse(), Ok(Errno::EADDRINUSE));
    assert_eq!("EWOULDBLOCK".parse(), Ok(Errno(libc::EAGAIN)));
    assert_eq!("enotsup".parse(), Ok(Errno(libc::EOPNOTSUPP)));
    for bad in ["", "E", "EADDRINUS", "EADDRINUSE ", "bind", "E9x"] {
        assert_eq!(
            bad.parse::<Errno>(),
            Err(ParseErrnoError(bad.to_owned())),
            "{bad:?}"
        );
    }
    assert_eq!(
        ParseErrnoError("x".into()).to_string(),
        "unknown errno name \"x\""
    );
}

#[test]
fn errno_serializes_as_its_name() {
    assert_eq!(
        serde_json::to_string(&Errno::EADDRINUSE).unwrap(),
        "\"EADDRINUSE\""
    );
    assert_eq!(
        serde_json::to_string(&Errno::UNKNOWN).unwrap(),
        "\"UNKNOWN\""
    );
}

#[test]
fn option_bits_known_and_unknown() {
    let raw = RawEvent {
        family: AF_INET6,
        addr: [0; 16],
        options: opt::REUSEADDR | opt::V6ONLY | opt::FREEBIND,
        options_known: opt::REUSEADDR | opt::REUSEPORT | opt::V6ONLY,
        ..bind_v4()
    };
    assert_eq!(
        decoded(raw).options,
        Options {
            reuse_addr: Some(true),
            reuse_port: Some(false),
            v6only: Some(true),
            // Set but not known: not trusted.
            freebind: None,
            transparent: None,
            bind_address_no_port: None,
        }
    );
    let all = RawEvent {
        options: opt::ALL,
        options_known: opt::ALL,
        ..raw
    };
    assert_eq!(decoded(all).options.bind_address_no_port, Some(true));
}

#[test]
fn v6only_is_never_reported_for_ipv4() {
    let raw = RawEvent {
        options: opt::V6ONLY,
        options_known: opt::ALL,
        ..bind_v4()
    };
    let options = decoded(raw).options;
    assert_eq!(options.v6only, None);
    assert_eq!(options.reuse_addr, Some(false));
}

#[test]
fn comm_with_and_without_nul() {
    let full = RawEvent {
        comm: *b"abcdefghijklmnop",
        ..bind_v4()
    };
    assert_eq!(decoded(full).process, "abcdefghijklmnop");
    let short = RawEvent {
        comm: comm(b"sshd"),
        ..bind_v4()
    };
    assert_eq!(decoded(short).process, "sshd");
    let empty = RawEvent {
        comm: [0; 16],
        ..bind_v4()
    };
    assert_eq!(decoded(empty).process, "");
    let after_nul = RawEvent {
        comm: comm(b"ab\0cd"),
        ..bind_v4()
    };
    assert_eq!(decoded(after_nul).process, "ab");
    let invalid = RawEvent {
        comm: comm(b"a\xffb"),
        ..bind_v4()
    };
    assert_eq!(decoded(invalid).process, "a\u{fffd}b");
}

#[test]
fn unknown_markers_become_none() {
    let raw = RawEvent {
        sock_uid: u32::MAX,
        cookie: 0,
        netns_cookie: 0,
        bound_port: 0,
        ..bind_v4()
    };
    let ev = decoded(raw);
    assert_eq!(ev.sock_uid, None);
    assert_eq!(ev.cookie, None);
    assert_eq!(ev.netns, None);
    assert_eq!(ev.bound_port, None);
    assert_eq!(decoded(RawEvent { sock_uid: 0, ..raw }).sock_uid, Some(0));
}

#[test]
fn endpoints_as_users_write_them() {
    let cases = [
        ("0.0.0.0", 8000, "0.0.0.0:8000"),
        ("127.0.0.1", 65535, "127.0.0.1:65535"),
        ("::1", 8000, "[::1]:8000"),
        ("::", 0, "[::]:0"),
        ("::", 8000, "[::]:8000"),
        ("::ffff:127.0.0.1", 80, "[::ffff:127.0.0.1]:80"),
    ];
    for (addr, port, want) in cases {
        assert_eq!(endpoint(addr.parse().unwrap(), port), want);
    }
}

#[test]
fn endpoint_prefers_the_bound_port() {
    let raw = RawEvent {
        port: 0,
        bound_port: 43210,
        ..bind_v4()
    };
    let ev = decoded(raw);
    assert_eq!(ev.endpoint(), "127.0.0.1:43210");
    assert_eq!(ev.requested_endpoint(), "127.0.0.1:0");
}

#[test]
fn an_event_concerns_the_requested_and_the_bound_port() {
    let ev = decoded(RawEvent {
        port: 0,
        bound_port: 43210,
        ..bind_v4()
    });
    assert!(ev.concerns_port(0) && ev.concerns_port(43210));
    assert!(!ev.concerns_port(8000));
}

#[test]
fn serde_names_match_name_methods() {
    let name = |v: serde_json::Value| v.as_str().unwrap().to_owned();
    for k in EventKind::ALL {
        assert_eq!(name(serde_json::to_value(k).unwrap()), k.name());
    }
    for p in Protocol::ALL {
        assert_eq!(name(serde_json::to_value(p).unwrap()), p.name());
    }
    for f in [Family::Ipv4, Family::Ipv6] {
        assert_eq!(name(serde_json::to_value(f).unwrap()), f.name());
    }
    for s in [
        Source::PostBind,
        Source::SyscallExit,
        Source::Fexit,
        Source::State,
        Source::Release,
        Source::Unresolved,
    ] {
        assert_eq!(name(serde_json::to_value(s).unwrap()), s.name());
    }
    for n in [1, 2, 3, 4, 5, 6, 10] {
        let t = SockType::try_from(n).unwrap();
        assert_eq!(name(serde_json::to_value(t).unwrap()), t.name());
    }
    assert_eq!(EventKind::BindFailed.to_string(), "bind_failed");
    assert_eq!(Protocol::UdpLite.to_string(), "udplite");
    assert_eq!(Source::SyscallExit.to_string(), "syscall_exit");
}

#[test]
fn boot_clock_adds_the_offset() {
    let clock = BootClock::from_offset_ns(1_700_000_000_000_000_000);
    assert_eq!(
        clock.to_system_time(5_500_000_001),
        SystemTime::UNIX_EPOCH + Duration::new(1_700_000_005, 500_000_001)
    );
    let before_epoch = BootClock::from_offset_ns(-10);
    assert_eq!(before_epoch.to_system_time(5), SystemTime::UNIX_EPOCH);
    // Nonsense offsets saturate instead of panicking.
    let huge = BootClock::from_offset_ns(i128::MAX - i128::from(u64::MAX));
    assert!(huge.to_system_time(u64::MAX) > SystemTime::UNIX_EPOCH);
}

#[test]
fn boot_clock_now_is_close_to_the_wall_clock() {
    let clock = BootClock::now();
    let boot_now = u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap();
    let wall = clock.to_system_time(boot_now);
    let diff = match wall.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    assert!(diff < Duration::from_secs(1), "off by {diff:?}");
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn records_with_known_values_decode(bytes in valid_record()) {
        let ev = decode(&bytes).unwrap();
        prop_assert_eq!(ev.errno.is_some(), ev.kind.is_failure());
        prop_assert!(ev.backlog.is_none() || ev.kind.is_listen());
        prop_assert!(ev.process.chars().count() <= 16);
        prop_assert!(!ev.process.contains('\0'));
        if ev.family == Family::Ipv4 {
            prop_assert!(ev.address.is_ipv4());
            prop_assert_eq!(ev.options.v6only, None);
        } else {
            prop_assert!(ev.address.is_ipv6());
        }
    }

    #[test]
    fn errno_names_round_trip(n in any::<i32>()) {
        prop_assert_eq!(Errno(n).name().parse::<Errno>(), Ok(Errno(n)));
    }
}
