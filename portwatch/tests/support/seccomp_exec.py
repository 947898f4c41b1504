"""Runs a command under a system call allow list, as systemd's
SystemCallFilter= does: seccomp_exec.py NAMES_FILE ERRNO COMMAND [ARGS...].

NAMES_FILE holds the allowed system call names (systemd's groups already
expanded); every other call fails with ERRNO (SystemCallErrorNumber=).
Needs Debian's python3-seccomp (libseccomp's bindings), which `cargo xtask
setup` installs, and no_new_privs or CAP_SYS_ADMIN (setpriv --no-new-privs).
"""

import errno
import os
import sys

import seccomp

names_file, error_name, *command = sys.argv[1:]
allowed = seccomp.SyscallFilter(seccomp.ERRNO(getattr(errno, error_name)))
with open(names_file) as names:
    for name in names.read().split():
        try:
            allowed.add_rule(seccomp.ALLOW, name)
        except RuntimeError:
            # A name this architecture does not have (systemd skips it too).
            pass
allowed.load()
os.execv(command[0], command)
