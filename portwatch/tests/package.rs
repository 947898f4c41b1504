//! The Debian package as an operator meets it: `cargo xtask package` builds
//! it, `dpkg -i` installs it on this machine, the files are where Debian
//! puts them, the installed unit passes `systemd-analyze verify` (its man
//! page included), `portwatch --version` runs, and `dpkg --purge` leaves
//! nothing behind.

use std::{path::Path, process::Command};

/// What the package installs, and must remove.
const FILES: [&str; 9] = [
    "/usr/bin/portwatch",
    "/usr/lib/systemd/system/portwatch.service",
    "/etc/portwatch/portwatch.toml",
    "/usr/share/man/man1/portwatch.1.gz",
    "/usr/share/bash-completion/completions/portwatch",
    "/usr/share/zsh/vendor-completions/_portwatch",
    "/usr/share/fish/vendor_completions.d/portwatch.fish",
    "/usr/share/portwatch/prometheus/alerts.yml",
    "/usr/share/portwatch/grafana/portwatch.json",
];

/// Runs `program args`; its stdout, or a panic with everything it said.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The installed package's status, or `None` if it is not installed.
fn installed_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "portwatch"])
        .output()
        .ok()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !status.contains("not-installed")).then_some(status)
}

/// Purges the package on drop, so a failed assertion leaves no install.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "portwatch"]).output();
    }
}

#[test]
#[ignore = "needs root, BTF and cgroup2; run by `cargo xtask test`"]
fn the_package_installs_runs_and_purges_cleanly() {
    // Not ours to replace or remove: fail, saying so, rather than pass.
    if let Some(status) = installed_status() {
        panic!(
            "portwatch is already installed on this machine ({status}); this test installs and \
             purges it: run it where the package is not installed"
        );
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["xtask", "package"])
        .current_dir(workspace)
        .output()
        .expect("cargo xtask package");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = said
        .lines()
        .find_map(|line| line.strip_prefix("built "))
        .expect("the package's path")
        .to_owned();

    // The package itself: its conffile, and a dependency line.
    let fields = run("dpkg-deb", &["-f", &deb, "Package", "Depends"]);
    assert!(fields.contains("Package: portwatch"), "{fields}");

    let _installed = Installed;
    run("dpkg", &["-i", &deb]);
    assert!(installed_status().is_some_and(|s| s.contains("install ok installed")));
    for file in FILES {
        assert!(Path::new(file).is_file(), "{file} is not installed");
    }
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "portwatch"]);
    assert!(
        conffiles.contains("/etc/portwatch/portwatch.toml"),
        "{conffiles}"
    );
    let version = run("/usr/bin/portwatch", &["--version"]);
    assert!(
        version.starts_with(&format!("portwatch {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    // The shipped config is valid as installed, as ExecStartPre checks it.
    run(
        "/usr/bin/portwatch",
        &[
            "daemon",
            "--check-config",
            "--config",
            "/etc/portwatch/portwatch.toml",
        ],
    );
    // The installed unit, with its real paths and man page.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/usr/lib/systemd/system/portwatch.service"])
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success() && said.is_empty(), "{said}");

    // Removal keeps the conffile (Debian's rule); purge removes everything.
    run("dpkg", &["-r", "portwatch"]);
    assert!(!Path::new("/usr/bin/portwatch").exists());
    assert!(Path::new("/etc/portwatch/portwatch.toml").exists());
    run("dpkg", &["--purge", "portwatch"]);
    assert!(installed_status().is_none());
    for file in FILES {
        assert!(!Path::new(file).exists(), "{file} is left after purge");
    }
    for dir in ["/etc/portwatch", "/usr/share/portwatch"] {
        assert!(!Path::new(dir).exists(), "{dir} is left after purge");
    }
}
