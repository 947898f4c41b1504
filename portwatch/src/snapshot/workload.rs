//! Which workload a process belongs to, in the words its operator uses: the
//! container's name, and on a Kubernetes node its pod, the pod's namespace
//! and uid. The cgroup path carries the ids; the names come from the node's
//! own files, so no API server is needed. A piece that cannot be known stays
//! `None` and is never guessed.
//!
//! Where each piece comes from:
//! - the pod uid: the kubelet's cgroup for the pod, in the path
//!   ([`pod_uid`]): `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//!   with the systemd driver, `kubepods/<qos>/pod<uid>` with cgroupfs;
//! - the pod's name and namespace: the kubelet's log directory for the pod,
//!   `/var/log/pods/<namespace>_<pod>_<uid>` ([`pod_log_dir`]);
//! - the container's name: the kubelet's log link for the container,
//!   `/var/log/containers/<pod>_<namespace>_<container>-<id>.log`
//!   ([`container_log_name`]), else Docker's
//!   `/var/lib/docker/containers/<id>/config.v2.json` ([`docker_container_name`]).
//!
//! The parsers are pure; [`Workloads`] does the reading, and remembers what
//! it found (a pod's uid and a container's id never change their names).
//!
//! Static pods, whose uid is the kubelet's hash of their manifest rather
//! than a UUID, get no uid: only the UUID shape the API server gives is
//! taken as a pod uid.

use std::{
    collections::HashMap,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde::Serialize;
use utoipa::ToSchema;

use super::owners::Place;

/// A workload's names, beyond the container id the cgroup path carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, ToSchema)]
pub struct Workload {
    /// The container's name, as its runtime or the kubelet names it.
    pub container_name: Option<String>,
    /// The Kubernetes pod's name.
    pub pod: Option<String>,
    /// The Kubernetes namespace of the pod.
    pub pod_namespace: Option<String>,
    /// The pod's uid, as the kubelet names its cgroup.
    pub pod_uid: Option<String>,
}

impl Workload {
    /// `self`, with what it does not know taken from `other`.
    pub fn or(self, other: Workload) -> Workload {
        Workload {
            container_name: self.container_name.or(other.container_name),
            pod: self.pod.or(other.pod),
            pod_namespace: self.pod_namespace.or(other.pod_namespace),
            pod_uid: self.pod_uid.or(other.pod_uid),
        }
    }
}

/// The pod uid in a cgroup path, as the kubelet names a pod's cgroup:
/// `kubepods-burstable-pod<uid>.slice`, `kubepods-besteffort-pod<uid>.slice`
/// or (guaranteed pods) `kubepods-pod<uid>.slice` with the systemd driver
/// (the uid's dashes written as `_`, since a dash separates slice levels);
/// `pod<uid>` below `kubepods`, `burstable` or `besteffort` with cgroupfs.
/// The pod's level is recognized by its own name, wherever it is: a daemon
/// in a pod has a cgroup namespace of its own, and sees other pods' paths
/// relative to its own cgroup (`/../../kubepods-besteffort-pod<uid>.slice/...`,
/// `/../../pod<uid>/<id>`), without the levels above. With several, the
/// innermost pod is the process's. `None` unless the uid is a UUID.
pub fn pod_uid(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (0..parts.len()).rev().find_map(|at| {
        let part = parts[at];
        if let Some(stem) = part.strip_suffix(".slice") {
            return POD_SLICES
                .iter()
                .find_map(|prefix| stem.strip_prefix(prefix))
                .and_then(systemd_uid);
        }
        let uid = part.strip_prefix("pod")?;
        let parent = *parts.get(at.checked_sub(1)?)?;
        (matches!(parent, "kubepods" | "burstable" | "besteffort" | "..") && is_uuid(uid))
            .then(|| uid.to_owned())
    })
}

/// How the kubelet's systemd driver names a pod's slice, before the uid.
const POD_SLICES: [&str; 3] = [
    "kubepods-burstable-pod",
    "kubepods-besteffort-pod",
    "kubepods-pod",
];

/// A uid as the systemd driver writes it in a slice name (`_` for `-`).
fn systemd_uid(escaped: &str) -> Option<String> {
    // A dash in the name would be a slice level, not part of the uid.
    if escaped.contains('-') {
        return None;
    }
    let uid = escaped.replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// `8-4-4-4-12` lowercase hex digits.
fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// An RFC 1123 label, as Kubernetes checks namespace and container names:
/// lowercase letters, digits and `-`, starting and ending alphanumeric, at
/// most 63 characters.
fn is_dns_label(text: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
}

/// An RFC 1123 subdomain, as Kubernetes checks pod names: labels joined
/// by `.`, at most 253 characters.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// A pod's names, as its log directory gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
}

/// The name of a kubelet pod log directory, `<namespace>_<pod>_<uid>`.
/// Namespace and pod names cannot contain `_`, so the split is exact.
pub fn pod_log_dir(name: &str) -> Option<PodNames> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && is_dns_label(namespace) && is_dns_subdomain(pod) && is_uuid(uid))
        .then(|| PodNames {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            uid: uid.to_owned(),
        })
}

/// A container, as its kubelet log link names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLog {
    pub pod: String,
    pub namespace: String,
    pub container: String,
    /// The container id (64 lowercase hex digits).
    pub id: String,
}

/// The name of a kubelet container log link,
/// `<pod>_<namespace>_<container>-<id>.log`.
pub fn container_log_name(name: &str) -> Option<ContainerLog> {
    let (names, id) = name.strip_suffix(".log")?.rsplit_once('-')?;
    let mut parts = names.split('_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none()
        && is_dns_subdomain(pod)
        && is_dns_label(namespace)
        && is_dns_label(container)
        && super::owners::is_container_id(id))
    .then(|| ContainerLog {
        pod: pod.to_owned(),
        namespace: namespace.to_owned(),
        container: container.to_owned(),
        id: id.to_owned(),
    })
}

/// The container name in Docker's `config.v2.json` (`"Name": "/web"`),
/// without its leading `/`. Docker's own rule for names,
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]+`, is checked.
pub fn docker_container_name(config: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "Name")]
        name: String,
    }
    let config: Config = serde_json::from_str(config).ok()?;
    let name = config.name.strip_prefix('/')?;
    let bytes = name.as_bytes();
    let valid = bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    valid.then(|| name.to_owned())
}

/// Where the node keeps the files that name workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRoots {
    /// The kubelet's pod log directories (`podLogsDir`).
    pub pod_logs: PathBuf,
    /// The kubelet's container log links.
    pub container_logs: PathBuf,
    /// Docker's per-container directories.
    pub docker_containers: PathBuf,
}

/// The kubelet's default `podLogsDir`.
pub const DEFAULT_POD_LOGS: &str = "/var/log/pods";
/// Where the kubelet links container logs (fixed in the kubelet).
pub const DEFAULT_CONTAINER_LOGS: &str = "/var/log/containers";
/// Docker's containers under its default data root.
pub const DEFAULT_DOCKER_CONTAINERS: &str = "/var/lib/docker/containers";

impl Default for WorkloadRoots {
    fn default() -> Self {
        WorkloadRoots {
            pod_logs: DEFAULT_POD_LOGS.into(),
            container_logs: DEFAULT_CONTAINER_LOGS.into(),
            docker_containers: DEFAULT_DOCKER_CONTAINERS.into(),
        }
    }
}

/// What one lookup found, or when it found nothing.
#[derive(Clone, Debug)]
enum Known<T> {
    Found(T),
    Missing(Instant),
}

/// The names a listing of a kubelet directory gave, by key, and when it
/// was listed.
#[derive(Debug)]
struct Listing<T> {
    by_key: HashMap<String, T>,
    at: Option<Instant>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            by_key: HashMap::new(),
            at: None,
        }
    }
}

/// Names found so far.
#[derive(Debug, Default)]
struct Learned {
    /// Pod log directories, by pod uid.
    pods: Listing<PodNames>,
    /// Container log links, by container id.
    containers: Listing<ContainerLog>,
    /// Docker's names, by container id.
    docker: HashMap<String, Known<String>>,
}

/// Finds workloads' names in the node's files, and remembers them.
///
/// A kubelet directory is listed whole, at most once per
/// [`Workloads::RETRY`] and only when a name is missing, so a burst of
/// events for new pods costs one listing, not one per pod; names found are
/// kept (a uid or an id never changes its names). The kubelet makes a pod's
/// log directory just after its first container starts, so a name missing
/// now is found by a later listing. Shared between threads: the lock is
/// never held while reading files.
#[derive(Debug)]
pub struct Workloads {
    roots: WorkloadRoots,
    learned: Mutex<Learned>,
}

impl Workloads {
    /// How long a listing, or a Docker lookup that found nothing, is
    /// believed.
    pub const RETRY: Duration = Duration::from_secs(5);
    /// Pods, and containers, remembered at most; each starts over past this.
    const CAPACITY: usize = 16_384;
    /// Directory entries read at most per listing.
    const MAX_LISTED: usize = 65_536;
    /// The most of a `config.v2.json` read (they are a few KiB).
    const MAX_CONFIG: u64 = 1 << 20;

    pub fn new(roots: WorkloadRoots) -> Workloads {
        Workloads {
            roots,
            learned: Mutex::new(Learned::default()),
        }
    }

    /// The workload of a process in cgroup `cgroup` and container `container`
    /// (its id, as [`super::owners::container_id`] finds it).
    pub fn of(&self, cgroup: Option<&str>, container: Option<&str>) -> Workload {
        self.of_at(cgroup, container, Instant::now())
    }

    fn of_at(&self, cgroup: Option<&str>, container: Option<&str>, now: Instant) -> Workload {
        let pod_uid = cgroup.and_then(pod_uid);
        let pod = pod_uid.as_deref().and_then(|uid| self.pod(uid, now));
        // The kubelet's link names a pod's container, and its pod: evidence
        // by the container id, when the pod's directory is not found.
        let link = container.and_then(|id| self.container_log(id, now));
        let container_name = match &link {
            Some(link) => Some(link.container.clone()),
            None => container.and_then(|id| self.docker_name(id, now)),
        };
        let (pod_name, pod_namespace) = match (pod, link) {
            (Some(names), _) => (Some(names.pod), Some(names.namespace)),
            (None, Some(link)) => (Some(link.pod), Some(link.namespace)),
            (None, None) => (None, None),
        };
        Workload {
            container_name,
            pod: pod_name,
            pod_namespace,
            pod_uid,
        }
    }

    /// [`Workloads::name_all`] for places shared between sockets (a
    /// snapshot's, as the map will keep them): each distinct place is named
    /// once, and its sockets share the result.
    pub fn name_shared<'a>(&self, places: impl IntoIterator<Item = &'a mut Arc<Place>>) {
        let mut named: HashMap<*const Place, Arc<Place>> = HashMap::new();
        let mut workloads: HashMap<Option<String>, Workload> = HashMap::new();
        for place in places {
            // Every place is alive while the loop runs, so an address names
            // one place.
            let shared = named.entry(Arc::as_ptr(place)).or_insert_with(|| {
                let mut copy = Place::clone(place);
                copy.workload = workloads
                    .entry(copy.cgroup.clone())
                    .or_insert_with(|| self.of(copy.cgroup.as_deref(), copy.container.as_deref()))
                    .clone();
                Arc::new(copy)
            });
            *place = shared.clone();
        }
    }

    /// Names the workloads of `places`, resolving each distinct cgroup once.
    pub fn name_all<'a>(&self, places: impl IntoIterator<Item = &'a mut Place>) {
        let mut named: HashMap<Option<String>, Workload> = HashMap::new();
        for place in places {
            place.workload = named
                .entry(place.cgroup.clone())
                .or_insert_with(|| self.of(place.cgroup.as_deref(), place.container.as_deref()))
                .clone();
        }
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The names of the pod with uid `uid`.
    fn pod(&self, uid: &str, now: Instant) -> Option<PodNames> {
        self.lookup(
            uid,
            now,
            |learned| &mut learned.pods,
            &self.roots.pod_logs,
            |name| pod_log_dir(name).map(|names| (names.uid.clone(), names)),
        )
    }

    /// The kubelet's log link of the container with id `id`.
    fn container_log(&self, id: &str, now: Instant) -> Option<ContainerLog> {
        self.lookup(
            id,
            now,
            |learned| &mut learned.containers,
            &self.roots.container_logs,
            |name| container_log_name(name).map(|log| (log.id.clone(), log)),
        )
    }

    /// `key` in the listing `which` of `dir`, listing `dir` again (each
    /// name through `parse`) if `key` is missing and the last listing is
    /// older than [`Workloads::RETRY`].
    fn lookup<T: Clone>(
        &self,
        key: &str,
        now: Instant,
        which: impl Fn(&mut Learned) -> &mut Listing<T>,
        dir: &Path,
        parse: impl Fn(&str) -> Option<(String, T)>,
    ) -> Option<T> {
        {
            let mut learned = self.learned();
            let listing = which(&mut learned);
            if let Some(found) = listing.by_key.get(key) {
                return Some(found.clone());
            }
            if listing
                .at
                .is_some_and(|at| now.duration_since(at) < Self::RETRY)
            {
                return None;
            }
            // Claimed: other threads wait for the next window.
            listing.at = Some(now);
        }
        let fresh: Vec<(String, T)> = listed(dir).filter_map(|name| parse(&name)).collect();
        let mut learned = self.learned();
        let listing = which(&mut learned);
        if listing.by_key.len() + fresh.len() > Self::CAPACITY {
            listing.by_key.clear();
        }
        listing
            .by_key
            .extend(fresh.into_iter().take(Self::CAPACITY));
        listing.by_key.get(key).cloned()
    }

    /// Docker's name of the container with id `id`.
    fn docker_name(&self, id: &str, now: Instant) -> Option<String> {
        match self.learned().docker.get(id) {
            Some(Known::Found(name)) => return Some(name.clone()),
            Some(Known::Missing(at)) if now.duration_since(*at) < Self::RETRY => return None,
            _ => {}
        }
        let found = self.read_docker_name(id);
        remember(&mut self.learned().docker, id, found.clone(), now);
        found
    }

    fn read_docker_name(&self, id: &str) -> Option<String> {
        let path = self.roots.docker_containers.join(id).join("config.v2.json");
        let mut text = String::new();
        fs::File::open(path)
            .ok()?
            .take(Self::MAX_CONFIG)
            .read_to_string(&mut text)
            .ok()?;
        docker_container_name(&text)
    }
}

/// Keeps what a lookup of `key` found, or that it found nothing at `now`.
fn remember<T>(map: &mut HashMap<String, Known<T>>, key: &str, found: Option<T>, now: Instant) {
    if map.len() >= Workloads::CAPACITY && !map.contains_key(key) {
        map.clear();
    }
    let known = match found {
        Some(value) => Known::Found(value),
        None => Known::Missing(now),
    };
    map.insert(key.to_owned(), known);
}

/// The names in directory `dir` (at most [`Workloads::MAX_LISTED`]); none
/// if it cannot be read.
fn listed(dir: &Path) -> impl Iterator<Item = String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .take(Workloads::MAX_LISTED)
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6b1e4f2a-3c1d-4e5f-9a8b-7c6d5e4f3a2b";
    const ESCAPED: &str = "6b1e4f2a_3c1d_4e5f_9a8b_7c6d5e4f3a2b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Cgroup paths as containerd, CRI-O, Docker and the kubelet (both
    /// drivers) make them, and what each says about the pod.
    #[test]
    fn pod_uids_from_recorded_cgroup_paths() {
        let found = [
            // containerd, systemd driver, each QoS class.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"),
            // CRI-O, systemd driver, and its conmon beside the container:
            // the monitor is in the pod's slice too.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{ESCAPED}.slice/crio-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{ESCAPED}.slice/crio-conmon-{ID}.scope"
            ),
            // The pod's own slice (the sandbox's pause process sits below).
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice"
            ),
            // cgroupfs driver (containerd or Docker via cri-dockerd).
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            // Under a prefix: a kind node's container, a test cgroup, a
            // cgroup namespace.
            format!(
                "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubepods.slice/kubepods-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/portwatch-test-1-0-k8s/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/../../kubepods/burstable/pod{UID}/{ID}"),
            // As a daemon in a pod of its own sees other pods: relative to
            // its own cgroup, in its cgroup namespace.
            format!("/../../kubepods-burstable-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"),
            format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/../../../kubepods-pod{ESCAPED}.slice/crio-{ID}.scope"),
            format!("/../../pod{UID}/{ID}"),
            // A kind node in a pod: the innermost pod is the process's.
            format!(
                "/kubepods/pod11111111-2222-3333-4444-555555555555/{ID}/kubepods/burstable/pod{UID}/{ID}"
            ),
        ];
        for path in &found {
            assert_eq!(pod_uid(path).as_deref(), Some(UID), "{path}");
        }
        let none = [
            // Not a pod.
            "/system.slice/nginx.service".to_owned(),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            "/".to_owned(),
            String::new(),
            // kubepods levels without a pod.
            "/kubepods.slice".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            "/kubepods/burstable".to_owned(),
            // Malformed uids.
            format!("/kubepods.slice/kubepods-pod{}.slice", &ESCAPED[1..]),
            format!("/kubepods.slice/kubepods-pod{}.slice", ESCAPED.to_uppercase()),
            format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            format!("/kubepods/pod{ESCAPED}/{ID}"),
            format!("/kubepods/pod{}x/{ID}", &UID[1..]),
            "/kubepods/pod/x".to_owned(),
            "/kubepods.slice/kubepods-podxyz.slice".to_owned(),
            // A static pod's uid is a hash, not a UUID.
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0123456789abcdef0123456789abcdef.slice".to_owned(),
            // An unknown QoS class.
            format!("/kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-pod{ESCAPED}.slice"),
            format!("/kubepods/guaranteed/pod{UID}"),
            // `pod<uid>` below something that is not a kubepods level.
            format!("/notkubepods/pod{UID}"),
            format!("/system.slice/pod{UID}"),
            format!("pod{UID}"),
        ];
        for path in &none {
            assert_eq!(pod_uid(path), None, "{path}");
        }
    }

    #[test]
    fn pod_log_directories_are_namespace_pod_uid() {
        assert_eq!(
            pod_log_dir(&format!("kube-system_coredns-7db6d8ff4d-x2x9q_{UID}")),
            Some(PodNames {
                namespace: "kube-system".into(),
                pod: "coredns-7db6d8ff4d-x2x9q".into(),
                uid: UID.into(),
            })
        );
        let dotted = pod_log_dir(&format!("default_web.example.com_{UID}")).unwrap();
        assert_eq!(dotted.pod, "web.example.com");
        for bad in [
            format!("default_web_{}", &UID[1..]),
            format!("default_web_{}", UID.to_uppercase()),
            format!("default_web_{UID}_extra"),
            format!("default_{UID}"),
            format!("_web_{UID}"),
            format!("default__{UID}"),
            format!("Default_web_{UID}"),
            format!("default_-web_{UID}"),
            format!("default_web-_{UID}"),
            format!("default_web..x_{UID}"),
            format!("de.fault_web_{UID}"),
            format!("{}_web_{UID}", "a".repeat(64)),
            // A static pod's hash uid.
            "kube-system_etcd-node1_0123456789abcdef0123456789abcdef".to_owned(),
            String::new(),
        ] {
            assert_eq!(pod_log_dir(&bad), None, "{bad}");
        }
    }

    #[test]
    fn container_log_links_are_pod_namespace_container_id() {
        assert_eq!(
            container_log_name(&format!(
                "coredns-7db6d8ff4d-x2x9q_kube-system_coredns-{ID}.log"
            )),
            Some(ContainerLog {
                pod: "coredns-7db6d8ff4d-x2x9q".into(),
                namespace: "kube-system".into(),
                container: "coredns".into(),
                id: ID.into(),
            })
        );
        let dashed =
            container_log_name(&format!("web-0_shop_istio-proxy-{ID}.log")).expect("parses");
        assert_eq!(
            (dashed.container.as_str(), dashed.id.as_str()),
            ("istio-proxy", ID)
        );
        for bad in [
            format!("web-0_shop_app-{ID}"),
            format!("web-0_shop_app-{}.log", &ID[1..]),
            format!("web-0_shop_app-{}.log", ID.to_uppercase()),
            format!("web-0_shop_app_{ID}.log"),
            format!("web-0_shop-{ID}.log"),
            format!("web-0_shop_app_x-{ID}.log"),
            format!("web-0_shop_-{ID}.log"),
            format!("web-0_sh.op_app-{ID}.log"),
            format!("web-0_shop_a.pp-{ID}.log"),
            format!("Web-0_shop_app-{ID}.log"),
            ".log".to_owned(),
        ] {
            assert_eq!(container_log_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn docker_names_come_from_config_v2() {
        let config = r#"{"ID":"0123","Name":"/web-1","Config":{"Hostname":"0123"},"State":{"Running":true}}"#;
        assert_eq!(docker_container_name(config).as_deref(), Some("web-1"));
        assert_eq!(
            docker_container_name(r#"{"Name":"/k8s_app_web-0_shop_x_0"}"#).as_deref(),
            Some("k8s_app_web-0_shop_x_0")
        );
        for bad in [
            "",
            "{",
            "[]",
            r#"{"ID":"0123"}"#,
            r#"{"Name":7}"#,
            r#"{"Name":""}"#,
            r#"{"Name":"/"}"#,
            r#"{"Name":"web"}"#,
            r#"{"Name":"/a/b"}"#,
            r#"{"Name":"/-web"}"#,
            r#"{"Name":"/we b"}"#,
            r#"{"Name":"/w"}"#,
        ] {
            assert_eq!(docker_container_name(bad), None, "{bad}");
        }
    }

    /// A node's files in a temporary directory, removed on drop.
    struct Node {
        dir: PathBuf,
    }

    impl Node {
        fn new(label: &str) -> Node {
            let dir =
                std::env::temp_dir().join(format!("pw-workload-{}-{label}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for sub in ["pods", "containers", "docker"] {
                fs::create_dir_all(dir.join(sub)).unwrap();
            }
            Node { dir }
        }

        fn roots(&self) -> WorkloadRoots {
            WorkloadRoots {
                pod_logs: self.dir.join("pods"),
                container_logs: self.dir.join("containers"),
                docker_containers: self.dir.join("docker"),
            }
        }

        fn pod(&self, namespace: &str, pod: &str, uid: &str) {
            fs::create_dir_all(self.dir.join(format!("pods/{namespace}_{pod}_{uid}/app"))).unwrap();
        }

        fn container_log(&self, pod: &str, namespace: &str, container: &str, id: &str) {
            let name = format!("{pod}_{namespace}_{container}-{id}.log");
            std::os::unix::fs::symlink("/nonexistent", self.dir.join("containers").join(name))
                .unwrap();
        }

        fn docker(&self, id: &str, config: &str) {
            let dir = self.dir.join("docker").join(id);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("config.v2.json"), config).unwrap();
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn pod_path(uid: &str, id: &str) -> String {
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        )
    }

    #[test]
    fn a_pod_container_gets_every_name_from_the_kubelet_files() {
        let node = Node::new("pod");
        node.pod("shop", "web-0", UID);
        node.pod("other", "unrelated", "11111111-2222-3333-4444-555555555555");
        node.container_log("web-0", "shop", "app", ID);
        // Docker's name (cri-dockerd's k8s_...) loses to the kubelet's.
        node.docker(ID, r#"{"Name":"/k8s_app_web-0_shop_x_0"}"#);
        fs::write(node.dir.join("pods/stray-file"), "").unwrap();
        let workloads = Workloads::new(node.roots());
        let path = pod_path(UID, ID);
        assert_eq!(
            workloads.of(Some(&path), Some(ID)),
            Workload {
                container_name: Some("app".into()),
                pod: Some("web-0".into()),
                pod_namespace: Some("shop".into()),
                pod_uid: Some(UID.into()),
            }
        );
        // Remembered: the files may go, the names stay.
        fs::remove_dir_all(node.dir.join("pods")).unwrap();
        fs::remove_dir_all(node.dir.join("containers")).unwrap();
        assert_eq!(
            workloads.of(Some(&path), Some(ID)).pod.as_deref(),
            Some("web-0")
        );
        assert_eq!(
            workloads
                .of(Some(&path), Some(ID))
                .container_name
                .as_deref(),
            Some("app")
        );
    }

    #[test]
    fn a_container_link_names_its_pod_when_the_pod_directory_is_not_there() {
        let node = Node::new("link");
        node.container_log("web-0", "shop", "app", ID);
        let workloads = Workloads::new(node.roots());
        // A daemon in a pod sees the path relative to its own cgroup.
        let path =
            format!("/../../kubepods-besteffort-pod{ESCAPED}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            workloads.of(Some(&path), Some(ID)),
            Workload {
                container_name: Some("app".into()),
                pod: Some("web-0".into()),
                pod_namespace: Some("shop".into()),
                pod_uid: Some(UID.into()),
            }
        );
    }

    #[test]
    fn a_listing_s_places_are_named_once_per_cgroup() {
        let node = Node::new("all");
        node.pod("shop", "web-0", UID);
        let workloads = Workloads::new(node.roots());
        let pod = Place::from_cgroups(&format!("0::{}\n", pod_path(UID, ID)));
        let host = Place::from_cgroups("0::/system.slice/nginx.service\n");
        let mut places = [pod.clone(), host.clone(), pod];
        workloads.name_all(places.iter_mut());
        let pods: Vec<Option<&str>> = places.iter().map(|p| p.workload.pod.as_deref()).collect();
        assert_eq!(pods, [Some("web-0"), None, Some("web-0")]);
        assert_eq!(places[1], host, "a host process has no workload");
        assert!(places.iter().all(|p| p.unit.is_some()), "the rest is kept");
    }

    #[test]
    fn a_docker_container_is_named_by_its_config() {
        let node = Node::new("docker");
        node.docker(ID, r#"{"Name":"/db"}"#);
        let other = ID.replace('0', "f");
        node.docker(&other, "not json");
        let workloads = Workloads::new(node.roots());
        let path = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(
            workloads.of(Some(&path), Some(ID)),
            Workload {
                container_name: Some("db".into()),
                ..Workload::default()
            }
        );
        assert_eq!(workloads.of(None, Some(&other)), Workload::default());
        // Nothing to look for: no I/O, nothing known.
        assert_eq!(
            workloads.of(Some("/system.slice/nginx.service"), None),
            Workload::default()
        );
    }

    #[test]
    fn what_is_missing_stays_none_and_is_looked_for_again_later() {
        let node = Node::new("late");
        let workloads = Workloads::new(node.roots());
        let path = pod_path(UID, ID);
        let start = Instant::now();
        let early = workloads.of_at(Some(&path), Some(ID), start);
        assert_eq!(
            early,
            Workload {
                pod_uid: Some(UID.into()),
                ..Workload::default()
            },
            "the uid is known from the path alone"
        );
        // The kubelet makes the log directory and link just after.
        node.pod("shop", "web-0", UID);
        node.container_log("web-0", "shop", "app", ID);
        let soon = start + Workloads::RETRY / 2;
        assert_eq!(
            workloads.of_at(Some(&path), Some(ID), soon),
            early,
            "not yet retried"
        );
        let later = start + Workloads::RETRY;
        let found = workloads.of_at(Some(&path), Some(ID), later);
        assert_eq!(found.pod.as_deref(), Some("web-0"));
        assert_eq!(found.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(found.container_name.as_deref(), Some("app"));
    }

    #[test]
    fn missing_or_unreadable_roots_give_nothing() {
        let workloads = Workloads::new(WorkloadRoots {
            pod_logs: "/nonexistent/pods".into(),
            container_logs: "/nonexistent/containers".into(),
            docker_containers: "/nonexistent/docker".into(),
        });
        let path = pod_path(UID, ID);
        assert_eq!(
            workloads.of(Some(&path), Some(ID)),
            Workload {
                pod_uid: Some(UID.into()),
                ..Workload::default()
            }
        );
        // A file where a directory should be.
        let node = Node::new("files");
        fs::remove_dir_all(node.dir.join("pods")).unwrap();
        fs::write(node.dir.join("pods"), "").unwrap();
        let workloads = Workloads::new(node.roots());
        assert_eq!(workloads.of(Some(&path), Some(ID)).pod, None);
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut map = HashMap::new();
        let now = Instant::now();
        for n in 0..Workloads::CAPACITY * 2 + 1 {
            remember(&mut map, &n.to_string(), Some(n), now);
            assert!(map.len() <= Workloads::CAPACITY);
        }
        assert!(matches!(
            map.get(&(Workloads::CAPACITY * 2).to_string()),
            Some(Known::Found(_))
        ));
    }
}
