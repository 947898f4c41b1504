//! Test fixtures for the root integration tests: a private cgroup, a private
//! network namespace, the real `portwatch trace` binary watching that cgroup,
//! and a forked worker that makes real sockets from inside both.
//!
//! Everything has a unique name and is removed on drop, including on panic.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    ffi::CString,
    io::{BufRead, BufReader, ErrorKind, Read, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod churn;
pub mod daemon;
pub mod deny;
pub mod exported;
pub mod kubelet;
pub mod pki;

/// How long a test waits for something the kernel should report promptly.
/// 20 s, or `PORTWATCH_TEST_DEADLINE_SECS` (`cargo xtask vm` raises it: an
/// emulated CPU loads and verifies the programs many times slower). A bound
/// on waiting for something that must happen, never a speed goal.
pub static DEADLINE: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    let secs = std::env::var("PORTWATCH_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
});

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test at a time, for a test binary whose tests fork workers: a worker
/// holds a copy of every descriptor open in the test process when it forks,
/// such as another test's worker pipes, and would keep that test's paused
/// worker from ever seeing its pipe close.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Calls `attempt` every 50 ms until it returns `Ok`; at [`DEADLINE`],
/// panics naming `what` with the last `Err` (what was there instead).
pub fn until<T, E: std::fmt::Display>(what: &str, mut attempt: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + *DEADLINE;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {:?} waiting for {what}: {last}", *DEADLINE)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// What a skipped test prints, on a line of its own, before it returns:
/// `cargo xtask test` and `cargo xtask vm` count such a test as skipped,
/// not passed. Written straight to stdout, past libtest's capture, so it is
/// seen whether or not the run shows test output.
pub const SKIP_MARK: &str = "PORTWATCH-SKIP:";

/// Ends a test that cannot run here because the kernel lacks `feature`
/// (say which, and since when): the caller returns right after.
pub fn skip(test: &str, feature: &str) {
    let line = format!("\n{SKIP_MARK} {test}: {feature}\n");
    let _ = std::io::stdout().write_all(line.as_bytes());
}

/// A name no other test or run uses: `portwatch-test-<pid>-<n>-<label>`.
pub fn unique(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("portwatch-test-{}-{n}-{label}", std::process::id())
}

/// A directory under the temp dir with a [`unique`] name, readable by
/// everyone (a sandboxed daemon runs as `nobody`), removed with everything
/// in it on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(label));
        std::fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|err| panic!("chmod {}: {err}", path.display()));
        TempDir { path }
    }

    /// Writes `contents` to the file `name` in this directory; its path.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Spawns `command`, whose program `cargo xtask setup` installs from the
/// Debian package `package`; panics saying so if it is not installed.
pub fn spawn_tool(command: &mut Command, package: &str) -> Child {
    match command.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == ErrorKind::NotFound => panic!(
            "{} is not installed (Debian package `{package}`): run `cargo xtask setup`",
            command.get_program().display()
        ),
        Err(err) => panic!("cannot run {}: {err}", command.get_program().display()),
    }
}

/// Runs such a tool (see [`spawn_tool`]) to the end with `stdin` as its
/// input; its output.
pub fn run_tool(command: &mut Command, package: &str, stdin: &[u8]) -> Output {
    let mut child = spawn_tool(
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        package,
    );
    let program = command.get_program().display().to_string();
    child
        .stdin
        .take()
        .expect("the tool's stdin")
        .write_all(stdin)
        .unwrap_or_else(|err| panic!("write to {program}: {err}"));
    child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("wait for {program}: {err}"))
}

/// What a command said: its stdout, then its stderr.
pub fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `promtool args...` with `stdin`: whether it succeeded, and what it said.
pub fn promtool(args: &[&str], stdin: &[u8]) -> (bool, String) {
    let output = run_tool(Command::new("promtool").args(args), "prometheus", stdin);
    (output.status.success(), said(&output))
}

pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    portwatch::capture::system::cgroup2_mount(&mounts).expect("a cgroup2 mount")
}

/// A child cgroup of the cgroup2 root, removed on drop.
pub struct CgroupGuard {
    pub path: PathBuf,
}

impl CgroupGuard {
    pub fn new(label: &str) -> CgroupGuard {
        let path = cgroup2_root().join(unique(label));
        std::fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        CgroupGuard { path }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // Workers exit on their own; give stragglers a moment, then remove.
        // Child cgroups a test made and left (a guard of shared levels
        // dropped before the levels below it) go first, deepest first.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dirs = Vec::new();
        descendants(&self.path, &mut dirs);
        dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
        dirs.push(self.path.clone());
        for dir in dirs {
            while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        // SAFETY: signalling a process of our own test cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Every directory below `dir` (cgroups: their files are not directories).
fn descendants(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            let path = entry.path();
            descendants(&path, out);
            out.push(path);
        }
    }
}

/// A network namespace with loopback up, removed on drop.
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn new(label: &str) -> NetnsGuard {
        // Namespace names are short in practice; keep ours readable but short.
        let name = format!(
            "pwt-{}-{}-{label}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let guard = NetnsGuard { name };
        run("ip", &["-n", &guard.name, "link", "set", "lo", "up"]);
        guard
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's cookie, the value events and the map carry.
    pub fn cookie(&self) -> u64 {
        self.run_in(|| portwatch::snapshot::netns_cookie_of_current_thread().expect("netns cookie"))
    }

    /// Runs `f` on a short-lived thread inside this namespace (setns moves
    /// only the calling thread); a panic in `f` goes on in the caller.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: moves only this short-lived thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `ip -n <ns> args...` (e.g. to add addresses).
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

/// The portwatch binary under test as a command, run through `wrapper` (a
/// command and its arguments, such as `setpriv ...`, to which portwatch's
/// command line is appended, and which must exec it) when one is given.
pub fn portwatch_command(wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(env!("CARGO_BIN_EXE_portwatch"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_portwatch")),
    }
}

/// `portwatch trace --json` watching one cgroup, stopped on drop.
pub struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Tracer {
    /// Starts the tracer and waits until it says the programs are attached.
    pub fn start(cgroup: &Path, extra: &[&str]) -> Tracer {
        Tracer::start_with(&[], cgroup, extra)
    }

    /// [`Tracer::start`] through `wrapper` (see [`portwatch_command`]).
    pub fn start_with(wrapper: &[&str], cgroup: &Path, extra: &[&str]) -> Tracer {
        let mut child = portwatch_command(wrapper)
            .args(["trace", "--json", "--cgroup"])
            .arg(cgroup)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portwatch trace");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = stderr_text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut text = sink
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    text.push_str(&line);
                    text.push('\n');
                }
                // After the line is kept, so that `stop` returns it.
                if line.starts_with("portwatch: tracing") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let mut tracer = Tracer {
            child,
            lines,
            stderr: stderr_text,
        };
        if ready.recv_timeout(*DEADLINE).is_err() {
            let status = tracer.child.try_wait();
            panic!(
                "portwatch trace did not attach within {:?} (status {status:?}); stderr:\n{}",
                *DEADLINE,
                tracer.stderr.lock().unwrap()
            );
        }
        tracer
    }

    /// The next event matching `pred`, skipping others; panics at the deadline.
    pub fn expect(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_after(what, pred).1
    }

    /// Like [`Tracer::expect`], and also every event received before the
    /// match (since the previous `expect`, `drain` or the start).
    pub fn expect_after(&self, what: &str, pred: impl Fn(&Value) -> bool) -> (Vec<Value>, Value) {
        let deadline = Instant::now() + *DEADLINE;
        let mut seen = Vec::new();
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
                    if pred(&event) {
                        return (before, event);
                    }
                    seen.push(line);
                    before.push(event);
                }
                Err(_) => break,
            }
        }
        panic!(
            "no event for {what} within {:?}; saw {} other events:\n{}\nstderr:\n{}",
            *DEADLINE,
            seen.len(),
            seen.join("\n"),
            self.stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
    }

    /// Every event that arrives until `quiet` passes without one.
    pub fn drain(&self, quiet: Duration) -> Vec<Value> {
        let mut events = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            events.push(serde_json::from_str(&line).expect("JSON line"));
        }
        events
    }

    /// The tracer's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops the tracer with SIGTERM and returns its stderr.
    pub fn stop(self) -> String {
        self.stop_with_status().1
    }

    /// Stops the tracer with SIGTERM: how it exited (`None` if it had to be
    /// killed), and its stderr.
    pub fn stop_with_status(mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.terminate();
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        (status, stderr)
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// One step a worker performs. Sockets are numbered in creation order.
#[derive(Clone, Debug)]
pub enum Op {
    /// socket(family of the address kind, SOCK_STREAM or SOCK_DGRAM, 0)
    Socket { v6: bool, udp: bool },
    /// socket(family, kind, protocol), for what `Socket` cannot make:
    /// MPTCP, UDP-Lite, AF_UNIX, netlink.
    SocketOf {
        family: i32,
        kind: i32,
        protocol: i32,
    },
    /// Takes `fd`, a socket the test made before the worker forked (so made
    /// outside the worker's cgroup), as the next socket.
    Adopt { fd: i32 },
    /// bind(sock, addr) with a non-inet address: an AF_UNIX path or the
    /// kernel-chosen netlink address.
    BindOther { sock: usize, addr: OtherAddr },
    /// setsockopt(sock, level, name, &value, 4)
    SetOpt {
        sock: usize,
        level: i32,
        name: i32,
        value: i32,
    },
    /// bind(sock, addr)
    Bind { sock: usize, addr: SocketAddr },
    /// The same bind, submitted as IORING_OP_BIND through io_uring: it never
    /// passes through the bind(2) syscall or its tracepoint.
    UringBind { sock: usize, addr: SocketAddr },
    /// listen(sock, backlog)
    Listen { sock: usize, backlog: i32 },
    /// connect(sock, addr), blocking.
    Connect { sock: usize, addr: SocketAddr },
    /// accept(sock): the new socket takes the next number.
    Accept { sock: usize },
    /// close(sock)
    Close { sock: usize },
    /// getsockname(sock): the result is the local port.
    LocalPort { sock: usize },
    /// Drops CAP_NET_BIND_SERVICE from the effective and permitted sets.
    DropNetBindService,
    /// Waits for one byte on the control pipe (lets the test look first).
    Pause,
}

/// A non-inet socket address for [`Op::BindOther`].
#[derive(Clone, Debug)]
pub enum OtherAddr {
    /// An AF_UNIX path (a second bind to an existing one is EADDRINUSE).
    Unix(PathBuf),
    /// AF_NETLINK, port id 0 (the kernel picks one), as getaddrinfo binds.
    Netlink,
}

impl Op {
    /// socket(AF_INET or AF_INET6, SOCK_STREAM, IPPROTO_MPTCP)
    pub fn mptcp(v6: bool) -> Op {
        Op::SocketOf {
            family: if v6 { libc::AF_INET6 } else { libc::AF_INET },
            kind: libc::SOCK_STREAM,
            protocol: libc::IPPROTO_MPTCP,
        }
    }
    /// socket(AF_INET or AF_INET6, SOCK_DGRAM, IPPROTO_UDPLITE)
    pub fn udplite(v6: bool) -> Op {
        Op::SocketOf {
            family: if v6 { libc::AF_INET6 } else { libc::AF_INET },
            kind: libc::SOCK_DGRAM,
            protocol: libc::IPPROTO_UDPLITE,
        }
    }
    pub fn tcp(v6: bool) -> Op {
        Op::Socket { v6, udp: false }
    }
    pub fn udp(v6: bool) -> Op {
        Op::Socket { v6, udp: true }
    }
    pub fn bind(sock: usize, addr: &str) -> Op {
        Op::Bind {
            sock,
            addr: addr.parse().expect("socket address"),
        }
    }
    /// listen(sock, 8): a backlog no test looks at.
    pub fn listen(sock: usize) -> Op {
        Op::Listen { sock, backlog: 8 }
    }
    pub fn reuseport(sock: usize) -> Op {
        Op::SetOpt {
            sock,
            level: libc::SOL_SOCKET,
            name: libc::SO_REUSEPORT,
            value: 1,
        }
    }
    pub fn reuseaddr(sock: usize) -> Op {
        Op::SetOpt {
            sock,
            level: libc::SOL_SOCKET,
            name: libc::SO_REUSEADDR,
            value: 1,
        }
    }
    /// Sockets 0 and 1, both SO_REUSEADDR, bound to `addr`; 0 listens, then
    /// 1's listen fails with EADDRINUSE (its 8th op). A failed listen.
    pub fn listen_conflict(addr: &str) -> [Op; 8] {
        [
            Op::tcp(false),
            Op::reuseaddr(0),
            Op::bind(0, addr),
            Op::tcp(false),
            Op::reuseaddr(1),
            Op::bind(1, addr),
            Op::listen(0),
            Op::listen(1),
        ]
    }
    pub fn v6only(sock: usize) -> Op {
        Op::SetOpt {
            sock,
            level: libc::IPPROTO_IPV6,
            name: libc::IPV6_V6ONLY,
            value: 1,
        }
    }
}

/// A forked process in the test cgroup (and netns) running [`Op`]s.
pub struct Worker {
    pub pid: u32,
    results: std::fs::File,
    control: Option<std::fs::File>,
    done: bool,
}

/// Per op: 0 or a positive value (fd, port) on success, `-errno` on failure.
pub type OpResult = i64;

impl Worker {
    /// Forks a worker that joins `cgroup` (and `netns`), runs `ops`, and exits
    /// (after a [`Op::Pause`], only once [`Worker::resume`] is called).
    pub fn spawn(cgroup: &Path, netns: Option<&NetnsGuard>, ops: &[Op]) -> Worker {
        let procs = CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("path without NUL");
        let netns_fd = netns.map(|ns| std::fs::File::open(ns.path()).expect("open netns"));
        let prepared: Vec<Prepared> = ops.iter().map(Prepared::new).collect();
        let wants_uring = ops.iter().any(|op| matches!(op, Op::UringBind { .. }));
        let (results_read, results_write) = pipe();
        let (control_read, control_write) = pipe();
        // SAFETY: after fork the child makes system calls on memory prepared
        // before the fork (plus an io_uring setup), then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                child_main(
                    &procs,
                    netns_fd.as_ref().map(AsRawFd::as_raw_fd),
                    &prepared,
                    wants_uring,
                    results_write.as_raw_fd(),
                    control_read.as_raw_fd(),
                    control_write.as_raw_fd(),
                )
            }
        }
        drop(results_write);
        drop(control_read);
        Worker {
            pid: pid as u32,
            results: std::fs::File::from(results_read),
            control: Some(std::fs::File::from(control_write)),
            done: false,
        }
    }

    /// A worker in `cgroup` listening on a loopback TCP port the kernel
    /// picks, until resumed or dropped; and that port.
    pub fn loopback_listener(cgroup: &Path) -> (Worker, u16) {
        let mut worker = Worker::spawn(
            cgroup,
            None,
            &[
                Op::tcp(false),
                Op::bind(0, "127.0.0.1:0"),
                Op::listen(0),
                Op::LocalPort { sock: 0 },
                Op::Pause,
            ],
        );
        let results = worker.results(4);
        assert!(results.iter().all(|&r| r >= 0), "listener: {results:?}");
        (worker, u16::try_from(results[3]).expect("a port"))
    }

    /// Results of the next `n` ops (blocks until the worker reports them).
    pub fn results(&mut self, n: usize) -> Vec<OpResult> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut buf = [0u8; 8];
            self.results.read_exact(&mut buf).expect("worker result");
            out.push(i64::from_ne_bytes(buf));
        }
        out
    }

    /// Lets a paused worker go on.
    pub fn resume(&mut self) {
        use std::io::Write;
        if let Some(control) = self.control.as_mut() {
            let _ = control.write_all(&[1]);
        }
    }

    /// Waits for the worker to exit; returns its exit status.
    pub fn wait(&mut self) -> i32 {
        self.control = None; // unblocks any pause
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        self.done = true;
        status
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: our own child.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            self.wait();
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        0,
        "pipe2"
    );
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// An [`Op`] with its socket address already encoded.
struct Prepared {
    op: Op,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
}

impl Prepared {
    fn new(op: &Op) -> Prepared {
        let (addr, addr_len) = match op {
            Op::Bind { addr, .. } | Op::UringBind { addr, .. } | Op::Connect { addr, .. } => {
                portwatch::socket::sockaddr(addr.ip(), addr.port())
            }
            Op::BindOther { addr, .. } => other_sockaddr(addr),
            // SAFETY: all-zero is a valid sockaddr_storage; unused.
            _ => (unsafe { std::mem::zeroed() }, 0),
        };
        Prepared {
            op: op.clone(),
            addr,
            addr_len,
        }
    }
}

/// `addr` as a sockaddr for bind(2).
fn other_sockaddr(addr: &OtherAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        OtherAddr::Unix(path) => {
            // SAFETY: sockaddr_storage is large and aligned enough.
            let sun = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_un>() };
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_encoded_bytes();
            assert!(bytes.len() < sun.sun_path.len(), "AF_UNIX path too long");
            for (to, from) in sun.sun_path.iter_mut().zip(bytes) {
                *to = *from as libc::c_char;
            }
            size_of::<libc::sa_family_t>() + bytes.len() + 1
        }
        OtherAddr::Netlink => {
            // SAFETY: as above.
            let snl = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_nl>() };
            snl.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            size_of::<libc::sockaddr_nl>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_NET_BIND_SERVICE: u32 = 10;

/// The worker's body: raw system calls on memory prepared before the fork.
unsafe fn child_main(
    procs: &CString,
    netns: Option<i32>,
    ops: &[Prepared],
    wants_uring: bool,
    results: i32,
    control: i32,
    control_parent_end: i32,
) -> ! {
    // SAFETY (whole body): raw system calls on pre-fork memory.
    unsafe {
        // Without this the child holds the pipe's write end itself, and a
        // pause would not end when the parent closes its end (`wait`).
        libc::close(control_parent_end);
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
        // "0" means "the writing process".
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(101);
        }
        libc::close(fd);
        if let Some(ns) = netns
            && libc::setns(ns, libc::CLONE_NEWNET) != 0
        {
            libc::_exit(102);
        }
        // A ring is per task: made here, in the child. (glibc holds its malloc
        // locks across fork, so the child may allocate.)
        let mut uring = if wants_uring {
            io_uring::IoUring::new(8).ok()
        } else {
            None
        };
        let mut socks = [-1i32; 1024];
        let mut count = 0usize;
        for prepared in ops {
            let result: i64 = match prepared.op {
                Op::Socket { v6, udp } => {
                    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
                    let kind = if udp {
                        libc::SOCK_DGRAM
                    } else {
                        libc::SOCK_STREAM
                    };
                    let fd = libc::socket(family, kind, 0);
                    if fd >= 0 && count < socks.len() {
                        socks[count] = fd;
                        count += 1;
                    }
                    ret(fd as i64)
                }
                Op::SocketOf {
                    family,
                    kind,
                    protocol,
                } => {
                    let fd = libc::socket(family, kind, protocol);
                    if fd >= 0 && count < socks.len() {
                        socks[count] = fd;
                        count += 1;
                    }
                    ret(fd as i64)
                }
                Op::Adopt { fd } => {
                    if count < socks.len() {
                        socks[count] = fd;
                        count += 1;
                    }
                    i64::from(fd)
                }
                Op::SetOpt {
                    sock,
                    level,
                    name,
                    value,
                } => ret(
                    libc::setsockopt(socks[sock], level, name, (&raw const value).cast(), 4) as i64,
                ),
                Op::Bind { sock, .. } | Op::BindOther { sock, .. } => ret(libc::bind(
                    socks[sock],
                    (&raw const prepared.addr).cast(),
                    prepared.addr_len,
                ) as i64),
                Op::UringBind { sock, .. } => match uring.as_mut() {
                    Some(ring) => uring_bind(ring, socks[sock], prepared),
                    None => -i64::from(libc::EINVAL),
                },
                Op::Listen { sock, backlog } => ret(libc::listen(socks[sock], backlog) as i64),
                Op::Connect { sock, .. } => ret(libc::connect(
                    socks[sock],
                    (&raw const prepared.addr).cast(),
                    prepared.addr_len,
                ) as i64),
                Op::Accept { sock } => {
                    let fd = libc::accept(socks[sock], std::ptr::null_mut(), std::ptr::null_mut());
                    if fd >= 0 && count < socks.len() {
                        socks[count] = fd;
                        count += 1;
                    }
                    ret(fd as i64)
                }
                Op::Close { sock } => ret(libc::close(socks[sock]) as i64),
                Op::LocalPort { sock } => {
                    let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    let rc = libc::getsockname(socks[sock], (&raw mut storage).cast(), &mut len);
                    if rc != 0 {
                        ret(-1)
                    } else {
                        // sin_port and sin6_port sit at the same offset.
                        let sin = &*(&raw const storage).cast::<libc::sockaddr_in>();
                        i64::from(u16::from_be(sin.sin_port))
                    }
                }
                Op::DropNetBindService => {
                    let mut header = CapHeader {
                        version: LINUX_CAPABILITY_VERSION_3,
                        pid: 0,
                    };
                    let mut data = [CapData {
                        effective: 0,
                        permitted: 0,
                        inheritable: 0,
                    }; 2];
                    let mut rc =
                        libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr());
                    if rc == 0 {
                        data[0].effective &= !(1 << CAP_NET_BIND_SERVICE);
                        data[0].permitted &= !(1 << CAP_NET_BIND_SERVICE);
                        rc = libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr());
                    }
                    ret(rc)
                }
                Op::Pause => {
                    let mut byte = 0u8;
                    libc::read(control, (&raw mut byte).cast(), 1);
                    0
                }
            };
            let bytes = result.to_ne_bytes();
            libc::write(results, bytes.as_ptr().cast(), 8);
        }
        libc::_exit(0)
    }
}

/// Submits one IORING_OP_BIND and returns its completion's result.
unsafe fn uring_bind(ring: &mut io_uring::IoUring, fd: i32, prepared: &Prepared) -> i64 {
    let entry = io_uring::opcode::Bind::new(
        io_uring::types::Fd(fd),
        (&raw const prepared.addr).cast(),
        prepared.addr_len,
    )
    .build();
    // SAFETY: the address outlives the request, which completes before we return.
    if unsafe { ring.submission().push(&entry) }.is_err() || ring.submit_and_wait(1).is_err() {
        return -i64::from(libc::EIO);
    }
    ring.completion()
        .next()
        .map_or(-i64::from(libc::EIO), |cqe| i64::from(cqe.result()))
}

/// 0/positive stays, -1 becomes `-errno`.
unsafe fn ret(rc: i64) -> i64 {
    if rc < 0 {
        // SAFETY: reading this thread's errno.
        -i64::from(unsafe { *libc::__errno_location() })
    } else {
        rc
    }
}

/// Whether this process may load BPF programs and make cgroups (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The last "total N" the tracer printed about records lost in the kernel.
pub fn total_dropped(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|line| line.split("total ").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}
