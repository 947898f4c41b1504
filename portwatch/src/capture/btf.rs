//! Kernel struct offsets for the programs, read from the kernel's own BTF.
//!
//! Rust eBPF programs have no CO-RE relocations, so the few `struct sock`
//! fields the tracepoints read (cookie, netns, owner uid, backlog, option
//! bits) are located here at start-up and handed to the programs through the
//! `OFFSETS` global. A field that cannot be found stays 0, which the programs
//! treat as "unknown": they leave that fact out rather than read a wrong one.

use std::path::Path;

use btfparse::{Offset, TypeInformation, TypeVariant};
use portwatch_ebpf::{FlagBit, KernelOffsets};

/// Why the offsets could not be computed at all.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Reading the BTF file failed.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The BTF data did not parse.
    #[error("parsing BTF: {0}")]
    Parse(String),
}

/// Offsets for the running kernel, plus the names of those not found.
pub fn kernel_offsets(vmlinux: &Path) -> Result<(KernelOffsets, Vec<&'static str>), BtfError> {
    let data = std::fs::read(vmlinux).map_err(|source| BtfError::Read {
        path: vmlinux.display().to_string(),
        source,
    })?;
    let types =
        TypeInformation::new(&Bytes(&data)).map_err(|err| BtfError::Parse(format!("{err:?}")))?;
    Ok(Resolver {
        types: &types,
        missing: Vec::new(),
    }
    .resolve())
}

/// btfparse reads through this trait; the file is small enough to hold.
struct Bytes<'a>(&'a [u8]);

impl btfparse::Readable for Bytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

struct Resolver<'a> {
    types: &'a TypeInformation,
    missing: Vec<&'static str>,
}

impl Resolver<'_> {
    fn resolve(mut self) -> (KernelOffsets, Vec<&'static str>) {
        let mut off = KernelOffsets {
            sk_cookie: self.bytes("sock", "__sk_common.skc_cookie"),
            sk_net: self.bytes("sock", "__sk_common.skc_net"),
            net_cookie: self.bytes("net", "net_cookie"),
            sk_max_ack_backlog: self.bytes("sock", "sk_max_ack_backlog"),
            sk_uid: self.bytes("sock", "sk_uid"),
            sk_num: self.bytes("sock", "__sk_common.skc_num"),
            net_ns_inum: self.bytes("net", "ns.inum"),
            socket_sk: self.bytes("socket", "sk"),
            sk_family: self.bytes("sock", "__sk_common.skc_family"),
            sk_cgrp_data: self.bytes("sock", "sk_cgrp_data"),
            cgroup_level: self.bytes("cgroup", "level"),
            ..KernelOffsets::default()
        };
        // A cgroup's ancestors: their ids before Linux 6.0, pointers to
        // them (each id then in its kernfs node) since.
        match self.offset("cgroup", "ancestor_ids") {
            Some(Offset::ByteOffset(ids)) => off.cgroup_ancestor_ids = ids,
            _ => {
                off.cgroup_ancestors = self.bytes("cgroup", "ancestors");
                off.cgroup_kn = self.bytes("cgroup", "kn");
                off.kernfs_node_id = self.bytes("kernfs_node", "id");
            }
        }
        // The reuse bits share one byte of `sock_common`; locate each bit.
        let reuse = self.bits("sock", "__sk_common.skc_reuse");
        let reuseport = self.bits("sock", "__sk_common.skc_reuseport");
        let ipv6only = self.bits("sock", "__sk_common.skc_ipv6only");
        if let (Some(reuse), Some(reuseport), Some(ipv6only)) = (reuse, reuseport, ipv6only) {
            let byte = reuse / 8;
            if reuseport / 8 == byte && ipv6only / 8 == byte {
                off.sk_reuse_byte = byte;
                off.reuse_shift = (reuse % 8) as u8;
                off.reuseport_shift = (reuseport % 8) as u8;
                off.ipv6only_shift = (ipv6only % 8) as u8;
            } else {
                self.missing
                    .push("sock_common reuse bits (not in one byte)");
            }
        }
        [off.freebind, off.transparent, off.bind_address_no_port] = self.inet_flag_bits();
        (off, self.missing)
    }

    /// Where IP_FREEBIND, IP_TRANSPARENT and IP_BIND_ADDRESS_NO_PORT live.
    /// Linux 6.6 moved them from bitfields of `struct inet_sock` into bits
    /// of its `unsigned long inet_flags`, numbered by `enum inet_flags`;
    /// either layout gives each flag a byte and a bit in it.
    fn inet_flag_bits(&mut self) -> [FlagBit; 3] {
        const FLAGS: [(&str, &str); 3] = [
            ("INET_FLAGS_FREEBIND", "freebind"),
            ("INET_FLAGS_TRANSPARENT", "transparent"),
            ("INET_FLAGS_BIND_ADDRESS_NO_PORT", "bind_address_no_port"),
        ];
        if let Some(Offset::ByteOffset(word)) = self.offset("inet_sock", "inet_flags") {
            return FLAGS.map(|(enumerator, _)| match self.enum_value(enumerator) {
                Some(bit) => flag_location(FlagLayout::WordBit { word, bit }),
                None => FlagBit::default(),
            });
        }
        FLAGS.map(|(_, member)| match self.offset("inet_sock", member) {
            Some(Offset::BitOffsetAndSize(bits, 1)) => flag_location(FlagLayout::Bitfield { bits }),
            _ => {
                self.missing.push(member);
                FlagBit::default()
            }
        })
    }

    /// Byte offset of `path` in struct `ty`, or 0 (unknown).
    fn bytes(&mut self, ty: &'static str, path: &'static str) -> u32 {
        match self.offset(ty, path) {
            Some(Offset::ByteOffset(bytes)) => bytes,
            _ => {
                self.missing.push(path);
                0
            }
        }
    }

    /// Bit offset of the one-bit-or-more field `path` in struct `ty`.
    fn bits(&mut self, ty: &'static str, path: &'static str) -> Option<u32> {
        match self.offset(ty, path) {
            Some(Offset::BitOffsetAndSize(bit, _size)) => Some(bit),
            Some(Offset::ByteOffset(bytes)) => Some(bytes * 8),
            None => {
                self.missing.push(path);
                None
            }
        }
    }

    fn offset(&self, ty: &str, path: &str) -> Option<Offset> {
        let tid = self.types.id_of(ty)?;
        self.types
            .offset_of(tid, path)
            .ok()
            .map(|(_, offset)| offset)
    }

    /// Value of the enumerator `name` in any enum of the kernel.
    fn enum_value(&mut self, name: &'static str) -> Option<u8> {
        let found = self.types.get().values().find_map(|ty| match ty {
            TypeVariant::Enum(en) => en
                .named_value_list()
                .iter()
                .find(|value| value.name == name)
                .map(|value| match value.value {
                    btfparse::Integer32Value::Signed(v) => i64::from(v),
                    btfparse::Integer32Value::Unsigned(v) => i64::from(v),
                }),
            _ => None,
        });
        let bit = found
            .and_then(|v| u8::try_from(v).ok())
            .filter(|bit| *bit < 64);
        if bit.is_none() {
            self.missing.push(name);
        }
        bit
    }
}

/// How the kernel stores a one-bit socket flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagLayout {
    /// Bit `bit` of the `unsigned long` at byte `word` of the struct
    /// (`inet_sock.inet_flags`, Linux 6.6+).
    WordBit { word: u32, bit: u8 },
    /// A one-bit bitfield at bit `bits` of the struct, as BTF counts it
    /// (`inet_sock.freebind:1` and friends, before 6.6).
    Bitfield { bits: u32 },
}

/// The byte and bit the programs read for a flag stored as `layout`.
/// Little-endian, as every bpf target portwatch builds (bpfel): bit n of a
/// word is in its byte n / 8.
fn flag_location(layout: FlagLayout) -> FlagBit {
    match layout {
        FlagLayout::WordBit { word, bit } => FlagBit::at_bit(word * 8 + u32::from(bit)),
        FlagLayout::Bitfield { bits } => FlagBit::at_bit(bits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset the programs rely on exists in this kernel's BTF.
    #[test]
    #[ignore = "reads the running kernel's BTF; run by `cargo xtask test`"]
    fn finds_every_offset_on_this_kernel() {
        let vmlinux = Path::new(super::super::system::VMLINUX_BTF);
        let (off, missing) = kernel_offsets(vmlinux).expect("BTF parses");
        assert!(missing.is_empty(), "missing: {missing:?}");
        for (name, value) in [
            ("sk_cookie", off.sk_cookie),
            ("sk_net", off.sk_net),
            ("net_ns_inum", off.net_ns_inum),
            ("net_cookie", off.net_cookie),
            ("sk_max_ack_backlog", off.sk_max_ack_backlog),
            ("sk_uid", off.sk_uid),
            ("sk_reuse_byte", off.sk_reuse_byte),
            ("sk_num", off.sk_num),
            ("socket_sk", off.socket_sk),
            ("sk_family", off.sk_family),
            ("sk_cgrp_data", off.sk_cgrp_data),
            ("cgroup_level", off.cgroup_level),
        ] {
            assert_ne!(value, 0, "{name} not found");
        }
        // The three bits live side by side: reuse:4, reuseport:1, ipv6only:1.
        assert_eq!(off.reuseport_shift, off.reuse_shift + 4);
        assert_eq!(off.ipv6only_shift, off.reuseport_shift + 1);
        for (name, flag) in [
            ("freebind", off.freebind),
            ("transparent", off.transparent),
            ("bind_address_no_port", off.bind_address_no_port),
        ] {
            assert!(flag.known(), "{name} not found");
            assert!(flag.shift < 8, "{name}: {flag:?}");
        }
        assert_ne!(off.freebind, off.transparent);
        assert!(off.knows_socket_cgroups(), "{off:?}");
    }

    #[test]
    fn a_bit_of_inet_flags_is_found_in_its_byte() {
        // This machine's 6.18: `inet_flags` at byte 800 (bit 6400),
        // INET_FLAGS_FREEBIND = 11, _TRANSPARENT = 15, _BIND_ADDRESS_NO_PORT = 18.
        let at = |bit| {
            let flag = flag_location(FlagLayout::WordBit { word: 800, bit });
            (flag.byte, flag.shift)
        };
        assert_eq!(at(11), (801, 3));
        assert_eq!(at(15), (801, 7));
        assert_eq!(at(18), (802, 2));
        assert_eq!(at(0), (800, 0));
        let high = flag_location(FlagLayout::WordBit { word: 760, bit: 63 });
        assert_eq!((high.byte, high.shift), (767, 7));
    }

    #[test]
    fn a_bitfield_is_found_by_its_bit_offset() {
        // Before 6.6: `__u8 recverr:1, is_icsk:1, freebind:1, ...`; with
        // that byte at 978, BTF puts freebind at bit offset 978 * 8 + 2.
        let freebind = flag_location(FlagLayout::Bitfield { bits: 978 * 8 + 2 });
        assert_eq!((freebind.byte, freebind.shift), (978, 2));
        let first = flag_location(FlagLayout::Bitfield { bits: 979 * 8 });
        assert_eq!((first.byte, first.shift), (979, 0));
        // Both layouts agree on the same bit.
        assert_eq!(
            flag_location(FlagLayout::WordBit { word: 8, bit: 13 }),
            flag_location(FlagLayout::Bitfield { bits: 8 * 8 + 13 })
        );
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("portwatch-btf-{}", std::process::id()));
        std::fs::write(&dir, b"not btf at all").unwrap();
        let result = kernel_offsets(&dir);
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(result, Err(BtfError::Parse(_))));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let result = kernel_offsets(Path::new("/nonexistent/portwatch/vmlinux"));
        assert!(matches!(result, Err(BtfError::Read { .. })));
    }
}
