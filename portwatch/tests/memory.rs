//! What the state of 100,000 listeners, one `/metrics` rendering and one
//! `/ephemeral` answer cost in memory, counted by this binary's allocator:
//! what the heap keeps, or its peak above where it stood before. Neither
//! depends on the machine's speed.
//!
//! The bench's API figure measures the same from outside (the daemon's RSS
//! while 32 clients read slowly); this keeps the cause from coming back. The
//! layout is the bench's: ports 10000-59999 on 127.0.0.1 and 127.0.0.2 in one
//! network namespace, so more than half of them inside the ephemeral range,
//! one owning process. No root needed.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU64,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::body::{Body, to_bytes};
use portwatch::{
    api::{self, ApiContext},
    event::{BootClock, Family, Protocol},
    map::{Holder, Observed},
    metrics::{BuildInfo, Metrics},
    snapshot::{
        ephemeral::{EphemeralListing, NetnsUsage},
        owners::Place,
    },
    socket::{ShareOptions, SockState, SocketFacts},
    state::{LINUX_EPHEMERAL_RANGE, State},
};
use tower::ServiceExt as _;

/// The heap in use, and its highest point since the last [`Counting::reset`].
struct Counting {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Counting {
    fn grew(&self, size: usize) {
        let now = self.now.fetch_add(size, Ordering::Relaxed) + size;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Starts a measurement: the peak is where the heap stands now.
    fn reset(&self) -> usize {
        let now = self.now.load(Ordering::Relaxed);
        self.peak.store(now, Ordering::Relaxed);
        now
    }
}

// SAFETY: every call is passed to the system allocator unchanged; only the
// sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            self.grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        self.now.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as the allocator may do it: the new block before the
            // old one is freed.
            self.grew(new_size);
            self.now.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static HEAP: Counting = Counting {
    now: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};

const LISTENERS: u32 = 100_000;
const PORTS: u32 = 50_000;
const FIRST_PORT: u16 = 10_000;
const HOST: u64 = 1;
const BENCH_NETNS: u64 = 7;

/// The bench's 100k listeners, and a listing of both namespaces' ranges.
fn state() -> State {
    // As a listing gives them: one place and holder list per process.
    let place = Arc::new(Place::default());
    let holders: Arc<[Holder]> = Arc::new([Holder {
        pid: 4242,
        process: "bench-worker".to_owned(),
    }]);
    let observed: Vec<Observed> = (0..LISTENERS)
        .map(|i| Observed {
            facts: SocketFacts {
                cookie: u64::from(i) + 1,
                netns: BENCH_NETNS,
                protocol: Protocol::Tcp,
                family: Family::Ipv4,
                address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / PORTS) as u8)),
                port: FIRST_PORT + (i % PORTS) as u16,
                state: SockState::Listening,
                options: ShareOptions {
                    reuse_addr: Some(true),
                    reuse_port: Some(false),
                    v6only: None,
                },
                uid: Some(0),
                bound_dev_if: 0,
            },
            holders: holders.clone(),
            inode: NonZeroU64::new(u64::from(i) + 1),
            place: place.clone(),
        })
        .collect();
    let mut state = State::new(1000, 1000);
    state.host_netns = HOST;
    state.ready = true;
    // As the daemon starts: the listing without owners, then the owners.
    let unowned: Vec<Observed> = observed
        .iter()
        .map(|seen| Observed {
            holders: Arc::new([]),
            place: Arc::default(),
            ..seen.clone()
        })
        .collect();
    state.map.merge_unowned(unowned, SystemTime::UNIX_EPOCH);
    state.map.attach_owners(observed);
    let usage = |netns| NetnsUsage {
        netns,
        range: LINUX_EPHEMERAL_RANGE,
        reserved: 0,
        reserved_ranges: Vec::new(),
        unprivileged_port_start: None,
        local_addresses: None,
        destinations: Vec::new(),
        destinations_total: 0,
        udp_ports: 0,
        place: Place::default(),
        seen: Default::default(),
        names: Vec::new(),
        connects: None,
        trend: None,
    };
    state.ephemeral = Some(EphemeralListing {
        namespaces: vec![usage(HOST), usage(BENCH_NETNS)],
        skipped: 0,
        taken_at: SystemTime::UNIX_EPOCH,
        elapsed: Duration::from_millis(1),
    });
    state
}

const MIB: usize = 1 << 20;

/// The heap's peak since `before` began, in bytes above where it stood.
fn peak_since(before: usize) -> usize {
    HEAP.peak.load(Ordering::Relaxed).saturating_sub(before)
}

/// Both in one test: the counter is the process's, and tests in one binary
/// run on parallel threads.
#[tokio::test]
async fn the_state_a_scrape_and_an_ephemeral_answer_stay_small_at_100k_listeners() {
    let before = HEAP.reset();
    let shared = Arc::new(RwLock::new(state()));
    let kept = HEAP.now.load(Ordering::Relaxed).saturating_sub(before);
    let listeners = shared.read().map(|s| s.map.len()).unwrap_or(0);
    assert_eq!(listeners, LISTENERS as usize);
    eprintln!(
        "the state of {LISTENERS} listeners: {:.1} MiB ({} bytes each)",
        kept as f64 / MIB as f64,
        kept / listeners
    );
    // The map's hash table is most of it. A list of holders per socket and
    // a tree node per port took 31.2 MiB here.
    assert!(
        kept <= 24 * MIB,
        "the state of {LISTENERS} listeners takes {:.1} MiB (at most 24)",
        kept as f64 / MIB as f64
    );
    let metrics = Metrics::new(shared.clone(), BuildInfo::current()).expect("metrics");

    let before = HEAP.reset();
    let text = metrics.render();
    let peak = peak_since(before);
    eprintln!(
        "/metrics at {LISTENERS} listeners: peak {:.1} MiB above the state, {} KiB of text",
        peak as f64 / MIB as f64,
        text.len() / 1024
    );
    // Every listener counted, whether or not its port has a series.
    let total =
        format!("portwatch_listeners_by_protocol{{family=\"ipv4\",protocol=\"tcp\"}} {LISTENERS}");
    assert!(text.contains(&total), "no `{total}` in the rendering");
    // A copy of every listener's facts is about 5.5 MiB. When the ephemeral
    // part built an anti-pattern per listener inside the range, a rendering
    // here peaked at 36.6 MiB.
    assert!(
        peak <= 8 * MIB,
        "a /metrics rendering peaked {:.1} MiB above the state (at most 8)",
        peak as f64 / MIB as f64
    );

    let (events, _) = tokio::sync::broadcast::channel(1);
    let router = api::router(ApiContext {
        state: shared,
        events,
        metrics: Arc::new(String::new),
        clock: BootClock::now(),
    });
    let request = axum::http::Request::get(format!("/ephemeral?netns={BENCH_NETNS}"))
        .body(Body::empty())
        .expect("a request");
    let before = HEAP.reset();
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("the whole body");
    let peak = peak_since(before);
    let answer = String::from_utf8_lossy(&body);
    eprintln!(
        "/ephemeral?netns={BENCH_NETNS}: peak {:.1} MiB, {} KiB of JSON",
        peak as f64 / MIB as f64,
        body.len() / 1024
    );
    assert_eq!(status, 200, "{answer}");
    // Ports 32768-59999 of the range, on two addresses each.
    let in_range = format!("\"listeners_in_range\":{}", 2 * (60_000 - 32_768));
    assert!(
        answer.contains(&in_range),
        "{}",
        &answer[..answer.len().min(2000)]
    );
    assert!(
        peak <= 4 * MIB,
        "an /ephemeral answer peaked {:.1} MiB above the state (at most 4)",
        peak as f64 / MIB as f64
    );
}
