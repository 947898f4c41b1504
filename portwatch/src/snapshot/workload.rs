//! Which workload a process belongs to, in the words its operator uses: the
//! container's name, and on a Kubernetes node its pod, the pod's namespace
//! and uid. The cgroup path carries the ids; the names come from the node's
//! own files, so no API server is needed. A piece that cannot be known stays
//! `None` and is never guessed.

use serde::Serialize;
use utoipa::ToSchema;

/// A workload's names, beyond the container id the cgroup path carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
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
