//! Random socket churn and what `ss` says afterwards: a seeded generator
//! (the predictor draws from it too), worker operations drawn from it, and
//! the listeners of a namespace as a multiset, so that the map tests
//! (in-process watcher) and the robustness tests (the daemon over HTTP)
//! compare against the kernel in one way.

use std::{net::IpAddr, process::Command};

use portwatch::socket::Protocol;

use super::{NetnsGuard, Op};

/// A seeded xorshift generator: one seed, one sequence of operations.
pub struct Rng {
    seed: u64,
    state: u64,
}

/// A seed no earlier run used: the process id mixed with the clock. A VM
/// boots to the same pid every time, so the pid alone would repeat there.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(std::process::id()) << 32 | u64::from(nanos)
}

impl Rng {
    /// Seeded from the environment variable `var` when it holds a number,
    /// else from this process id; prints the seed and how to replay it.
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(fresh_seed);
        println!("seed {seed} ({var}={seed} to replay)");
        Rng {
            seed,
            // xorshift never leaves 0.
            state: seed.max(1),
        }
    }

    /// The seed, for failure messages.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What [`random_ops`] makes.
#[derive(Clone, Copy, Debug)]
pub struct Churn {
    /// Operations per worker (a little more: a socket's steps stay together).
    pub ops: usize,
    /// Ports are drawn from `first_port..first_port + ports`, so that binds
    /// collide often.
    pub first_port: u16,
    pub ports: usize,
    /// Also set SO_REUSEPORT on some sockets and IPV6_V6ONLY on some IPv6
    /// ones (drawn from the generator only when on, so that a seed without
    /// them makes the same operations as before they existed).
    pub sharing_options: bool,
}

/// One worker's random sockets: TCP or UDP, IPv4 or IPv6, loopback or
/// wildcard, some with SO_REUSEADDR (and the [`Churn::sharing_options`]),
/// bound, most TCP ones listening, and closed again at random; at most 64
/// open at once. Binds that fail (EADDRINUSE) are part of the churn.
pub fn random_ops(rng: &mut Rng, churn: &Churn) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut sockets = 0;
    while ops.len() < churn.ops {
        match rng.below(4) {
            0 | 1 if open.len() < 64 => {
                let (v6, udp) = (rng.below(2) == 1, rng.below(2) == 1);
                ops.push(Op::Socket { v6, udp });
                if rng.below(2) == 1 {
                    ops.push(Op::reuseaddr(sockets));
                }
                if churn.sharing_options {
                    if rng.below(3) == 0 {
                        ops.push(Op::reuseport(sockets));
                    }
                    if v6 && rng.below(2) == 0 {
                        ops.push(Op::v6only(sockets));
                    }
                }
                let port = usize::from(churn.first_port) + rng.below(churn.ports);
                let addr = match (v6, rng.below(2)) {
                    (false, 0) => format!("127.0.0.1:{port}"),
                    (false, _) => format!("0.0.0.0:{port}"),
                    (true, 0) => format!("[::1]:{port}"),
                    (true, _) => format!("[::]:{port}"),
                };
                ops.push(Op::bind(sockets, &addr));
                if !udp && rng.below(3) > 0 {
                    ops.push(Op::Listen {
                        sock: sockets,
                        backlog: 16,
                    });
                }
                open.push(sockets);
                sockets += 1;
            }
            _ if !open.is_empty() => {
                let sock = open.swap_remove(rng.below(open.len()));
                ops.push(Op::Close { sock });
            }
            _ => {}
        }
    }
    ops
}

/// One listener as `ss` shows it.
pub type Listing = (Protocol, IpAddr, u16);

/// `ss -tulnH` in `netns`, one (protocol, address, port) per socket, sorted:
/// a multiset, so that two sockets on one address count twice.
pub fn ss_listeners(netns: &NetnsGuard) -> Vec<Listing> {
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ss", "-tulnH"])
        .output()
        .expect("run ss");
    assert!(output.status.success(), "{output:?}");
    let mut listing: Vec<Listing> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let protocol = Protocol::from_name(fields.first()?)?;
            let local = fields.get(4)?;
            let (address, port) = local.rsplit_once(':')?;
            let address = address.trim_start_matches('[').trim_end_matches(']');
            let address = if address == "*" { "::" } else { address };
            let address = address.split('%').next()?;
            Some((protocol, address.parse().ok()?, port.parse().ok()?))
        })
        .collect();
    listing.sort_unstable();
    listing
}

/// What `a` has more often than `b` (both sorted).
pub fn excess(a: &[Listing], b: &[Listing]) -> Vec<Listing> {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|item| match rest.binary_search(item) {
            Ok(i) => {
                rest.remove(i);
                false
            }
            Err(_) => true,
        })
        .copied()
        .collect()
}

/// How portwatch's listing `got` differs from `ss`'s `expected`, for a
/// failure message.
pub fn difference(got: &[Listing], expected: &[Listing]) -> String {
    format!(
        "only in portwatch: {:?}\nonly in ss: {:?}",
        excess(got, expected),
        excess(expected, got)
    )
}
