//! A second cgroup program that refuses binds to one port, as another
//! tool's bind protection would (Cilium's at the root cgroup is one). Only
//! tests use it, and only on the child cgroup a test created: it is
//! attached there with BPF_F_ALLOW_MULTI beside portwatch's programs and
//! goes away with that cgroup.
//!
//! Six instructions loaded with the raw bpf(2) system call, so that no
//! refusing program ever ships in portwatch's own object:
//! `return ctx->src_port == port ? 0 : 1` as a `post_bind4` program.

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_CGROUP_INET4_POST_BIND: u32 = 12;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// `offsetof(struct bpf_sock, src_port)`: host byte order.
const SRC_PORT: i16 = 44;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to
/// `expected_attach_type`.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// The loaded program; it stays attached until its cgroup is removed.
pub struct DenyPort {
    _prog: OwnedFd,
}

impl DenyPort {
    /// Loads the program and attaches it to `cgroup` (a test's own child
    /// cgroup): every IPv4 bind to `port` there fails with EPERM.
    pub fn attach(cgroup: &Path, port: u16) -> DenyPort {
        let insns = [
            // r2 = ((struct bpf_sock *)r1)->src_port
            Insn {
                code: 0x61,
                regs: 0x12,
                off: SRC_PORT,
                imm: 0,
            },
            // if r2 != port goto allow
            Insn {
                code: 0x55,
                regs: 0x02,
                off: 2,
                imm: i32::from(port),
            },
            // r0 = 0; exit (refuse)
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: 0,
            },
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
            // allow: r0 = 1; exit
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: 1,
            },
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        // Before 5.11 a program's memory counts against RLIMIT_MEMLOCK, and
        // a test process keeps the default: lift it, as portwatch does.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; root may raise it.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(b"pwt_deny");
        let load = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: BPF_CGROUP_INET4_POST_BIND,
        };
        // SAFETY: bpf(2) with an attr of the size passed; the pointers in it
        // outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const load,
                size_of::<ProgLoad>(),
            )
        };
        assert!(
            fd >= 0,
            "load the deny program: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor the kernel just gave us.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let dir = File::open(cgroup).expect("open the test's cgroup");
        let attach = ProgAttach {
            target_fd: dir.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_POST_BIND,
            attach_flags: BPF_F_ALLOW_MULTI,
        };
        // SAFETY: as above.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_ATTACH,
                &raw const attach,
                size_of::<ProgAttach>(),
            )
        };
        assert_eq!(
            rc,
            0,
            "attach the deny program to {}: {}",
            cgroup.display(),
            std::io::Error::last_os_error()
        );
        DenyPort { _prog: prog }
    }
}
