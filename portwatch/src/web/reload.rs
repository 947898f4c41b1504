//! Reloading the listeners' web.yml without a restart, so that short-lived
//! certificates rotate and users change while the map stays: on SIGHUP
//! (`systemctl reload portwatch`), and when the web.yml or a file it names
//! changes (inotify on their directories, which also sees the atomic
//! renames of certbot and of Kubernetes Secret volumes). Nothing runs at
//! rest: no poll timer. A reload that fails keeps the settings in use.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{
    Event, EventKind, EventKindMask, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::{signal::unix::Signal, sync::Notify};

use super::{Gate, Reloaded};

/// How long file events settle before a reload: a rotation writes the
/// certificate and the key one after the other.
const SETTLE: Duration = Duration::from_millis(300);

/// Reloads every gate on SIGHUP (`hangup`, installed by the caller before
/// anything else so the default action never kills the daemon) and on
/// changes to their files, until `stop`.
pub async fn run(gates: Vec<Arc<Gate>>, mut hangup: Signal, stop: impl Future<Output = ()>) {
    let changed = Arc::new(Notify::new());
    let mut files = Files::new(changed.clone());
    files.watch(&gates);
    tokio::pin!(stop);
    loop {
        let why = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            () = changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                "a file change"
            }
            () = &mut stop => return,
        };
        for gate in &gates {
            // File reads and a bcrypt hash: not on a runtime thread.
            let reloading = gate.clone();
            match tokio::task::spawn_blocking(move || reloading.reload()).await {
                Ok(Reloaded::Unchanged) if why == "SIGHUP" => {
                    tracing::info!(listener = gate.listener, "SIGHUP: web_config unchanged");
                }
                Ok(Reloaded::Unchanged | Reloaded::Changed | Reloaded::Failed(_)) => {}
                Err(err) => {
                    tracing::error!(listener = gate.listener, %err, "reloading web_config failed")
                }
            }
        }
        // A reload may name new files in new directories.
        files.watch(&gates);
    }
}

/// The inotify watches on the directories of the gates' files, made only
/// once there is a file to watch (no web_config: no inotify, no thread).
struct Files {
    changed: Arc<Notify>,
    watcher: Option<notify::RecommendedWatcher>,
    failed: bool,
    /// Directories that could not be watched, said once each.
    unwatchable: BTreeSet<PathBuf>,
}

impl Files {
    fn new(changed: Arc<Notify>) -> Files {
        Files {
            changed,
            watcher: None,
            failed: false,
            unwatchable: BTreeSet::new(),
        }
    }

    fn watch(&mut self, gates: &[Arc<Gate>]) {
        let dirs: BTreeSet<PathBuf> = gates
            .iter()
            .flat_map(|gate| gate.settings().files.clone())
            .filter_map(|file| file.parent().map(directory))
            .collect();
        if dirs.is_empty() || self.failed {
            return;
        }
        let watcher = match &mut self.watcher {
            Some(watcher) => watcher,
            None => {
                let changed = self.changed.clone();
                // Writes, creations, removals and renames only: reads of
                // those files (ours included) do not even wake the watcher.
                let kinds = EventKindMask::CORE | EventKindMask::ACCESS_CLOSE;
                let made = notify::RecommendedWatcher::new(
                    move |event: notify::Result<Event>| {
                        if event.is_ok_and(|event| is_change(&event.kind)) {
                            changed.notify_one();
                        }
                    },
                    notify::Config::default().with_event_kinds(kinds),
                );
                match made {
                    Ok(watcher) => self.watcher.insert(watcher),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot watch web_config files; reload with SIGHUP");
                        self.failed = true;
                        return;
                    }
                }
            }
        };
        // Every time, not only for new directories: a directory removed
        // and made again (a rotation tool's) lost its watch with it, and
        // watching a path again replaces its watch.
        for dir in &dirs {
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.unwatchable.remove(dir);
                }
                Err(err) => {
                    if self.unwatchable.insert(dir.clone()) {
                        tracing::warn!(
                            dir = %dir.display(),
                            error = %err,
                            "cannot watch for web_config changes there; reload with SIGHUP"
                        );
                    }
                }
            }
        }
    }
}

/// `""` (a bare file name's parent) is the working directory.
fn directory(parent: &Path) -> PathBuf {
    if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    }
}

/// A write, a creation, a removal or a rename; not the opens and reads that
/// a reload itself makes.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, ModifyKind};

    use super::*;

    #[test]
    fn reads_are_not_changes() {
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
    }
}
