//! A Kubernetes node's workload files, faked: the kubelet's pod log
//! directories and container log links, Docker's container configuration,
//! and pod cgroups named the way the kubelet's systemd driver and containerd
//! name them. There is no cluster here; the daemon is pointed at these.

use std::{
    hash::{BuildHasher as _, RandomState},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::TempDir;

/// 32 random lowercase hex digits per call.
pub fn random_hex() -> String {
    let random = || RandomState::new().hash_one(std::process::id());
    format!("{:016x}{:016x}", random(), random())
}

/// A fresh pod uid (a UUID) and container id (64 hex digits).
pub fn ids() -> (String, String) {
    let hex = random_hex();
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    (uid, format!("{}{}", random_hex(), random_hex()))
}

/// The node's files that name workloads: `pods/`, `containers/` and
/// `docker/` in a temporary directory, and the daemon's configuration
/// pointing there.
pub struct FakeNode {
    pub dir: TempDir,
}

impl FakeNode {
    pub fn new() -> FakeNode {
        let dir = TempDir::new("node");
        for sub in ["pods", "containers", "docker"] {
            std::fs::create_dir(dir.path.join(sub)).expect("mkdir in the fake node");
        }
        FakeNode { dir }
    }

    pub fn config(&self) -> String {
        let at = |sub: &str| self.dir.path.join(sub).display().to_string();
        format!(
            "reconcile_interval = \"1h\"\npod_logs_dir = {:?}\ncontainer_logs_dir = {:?}\ndocker_containers_dir = {:?}\n",
            at("pods"),
            at("containers"),
            at("docker")
        )
    }

    /// The kubelet's log directory for a pod, and its container's log link.
    pub fn pod(&self, namespace: &str, pod: &str, uid: &str, container: &str, id: &str) {
        let logs = self
            .dir
            .path
            .join(format!("pods/{namespace}_{pod}_{uid}/{container}"));
        std::fs::create_dir_all(&logs).expect("mkdir the pod's logs");
        std::fs::write(logs.join("0.log"), "").expect("write the container's log");
        std::os::unix::fs::symlink(
            logs.join("0.log"),
            self.dir
                .path
                .join(format!("containers/{pod}_{namespace}_{container}-{id}.log")),
        )
        .expect("link the container's log");
    }

    /// Docker's configuration of a container named `name`.
    pub fn docker(&self, id: &str, name: &str) {
        let dir = self.dir.path.join("docker").join(id);
        std::fs::create_dir(&dir).expect("mkdir the container's directory");
        let config = serde_json::json!({ "ID": id, "Name": format!("/{name}"), "State": {} });
        std::fs::write(dir.join("config.v2.json"), config.to_string())
            .expect("write config.v2.json");
    }
}

/// Cgroups below the test cgroup, made outermost first and removed
/// innermost first on drop (any process left in them killed). Levels two
/// of them share are made by the first and removed by the last.
pub struct Cgroups {
    made: Vec<PathBuf>,
    pub leaf: PathBuf,
}

impl Cgroups {
    /// `parent/relative`, each level made unless it exists.
    pub fn new(parent: &Path, relative: &str) -> Cgroups {
        let mut made = Vec::new();
        let mut path = parent.to_path_buf();
        for level in relative.split('/') {
            path.push(level);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
                made.push(path.clone());
            }
        }
        Cgroups { made, leaf: path }
    }

    /// A pod container's cgroup as the kubelet's systemd driver and
    /// containerd make it.
    pub fn pod_container(parent: &Path, uid: &str, id: &str) -> Cgroups {
        let escaped = uid.replace('-', "_");
        Cgroups::new(
            parent,
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice/cri-containerd-{id}.scope"
            ),
        )
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs.lines().filter_map(|p| p.parse().ok()).collect();
                if pids.is_empty() && dir.exists() {
                    // Another guard's cgroups are still below: its to remove.
                    break;
                }
                for pid in pids {
                    // SAFETY: signalling a process of our own test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
