//! Reads one fact from the kernel's BTF (`/sys/kernel/btf/vmlinux`): where `sk_rmem_alloc`
//! sits in `struct sock`, so that `skmsg` can read how much a paired socket holds unread.
//!
//! Only the parts of the format needed to walk the type list and the members of a struct or
//! union are decoded (`include/uapi/linux/btf.h`); the file is the running kernel's, in its
//! own byte order.

use thiserror::Error;

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why an offset couldn't be found.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    /// Not BTF, or cut short.
    #[error("not a BTF blob: {0}")]
    Format(&'static str),
    /// A kind this reader doesn't know, so it can't step over it.
    #[error("unknown BTF kind {0}")]
    Kind(u32),
    /// The struct or member isn't there (or has another shape).
    #[error("{0} not found")]
    Missing(String),
}

/// A parsed BTF blob: the string section and where each type starts.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Start of type id `i + 1` within `types` (id 0 is void).
    starts: Vec<usize>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(BtfError::Format("truncated"))
}

fn usize_at(data: &[u8], at: usize) -> Result<usize, BtfError> {
    usize::try_from(u32_at(data, at)?).map_err(|_| BtfError::Format("offset too large"))
}

/// Bytes that follow a type's common 12 bytes, by kind.
fn extra_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        other => return Err(BtfError::Kind(other)),
    })
}

impl<'a> Btf<'a> {
    /// Indexes `data`.
    ///
    /// # Errors
    /// Not BTF in this machine's byte order, cut short, or a kind this reader doesn't know.
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let magic = data
            .get(..2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_ne_bytes)
            .ok_or(BtfError::Format("truncated"))?;
        if magic != MAGIC {
            return Err(BtfError::Format("bad magic"));
        }
        let hdr_len = usize_at(data, 4)?;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Format("short header"));
        }
        let section = |off: usize, len: usize| -> Result<&'a [u8], BtfError> {
            let start = hdr_len + usize_at(data, off)?;
            let end = start + usize_at(data, len)?;
            data.get(start..end).ok_or(BtfError::Format("truncated"))
        };
        let types = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            starts.push(at);
            let info = u32_at(types, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            at += TYPE_LEN + extra_len((info >> 24) & 0x1f, vlen)?;
        }
        if at != types.len() {
            return Err(BtfError::Format("truncated"));
        }
        Ok(Btf {
            types,
            strings,
            starts,
        })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = usize::try_from(off)
            .ok()
            .and_then(|o| self.strings.get(o..))
            .unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// (name offset, info, size or type) of type `id`.
    fn header(&self, id: u32) -> Result<(usize, u32, u32, u32), BtfError> {
        let start = usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.starts.get(i))
            .copied()
            .ok_or(BtfError::Format("type id out of range"))?;
        Ok((
            start,
            u32_at(self.types, start)?,
            u32_at(self.types, start + 4)?,
            u32_at(self.types, start + 8)?,
        ))
    }

    /// The id of the struct named `name`.
    fn find_struct(&self, name: &str) -> Result<u32, BtfError> {
        for id in 1..=self.starts.len() {
            let id = u32::try_from(id).map_err(|_| BtfError::Format("too many types"))?;
            let (_, name_off, info, _) = self.header(id)?;
            if (info >> 24) & 0x1f == KIND_STRUCT && self.name(name_off) == name.as_bytes() {
                return Ok(id);
            }
        }
        Err(BtfError::Missing(format!("struct {name}")))
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<(u32, u32, u32), BtfError> {
        for _ in 0..32 {
            let (_, _, info, size_or_type) = self.header(id)?;
            match (info >> 24) & 0x1f {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = size_or_type;
                }
                kind => return Ok((id, kind, size_or_type)),
            }
        }
        Err(BtfError::Format("typedef chain too long"))
    }

    /// Bit offset and type of member `name` of struct or union `id`.
    fn member(&self, id: u32, name: &str) -> Result<(u32, u32), BtfError> {
        let (start, _, info, _) = self.header(id)?;
        let kind = (info >> 24) & 0x1f;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return Err(BtfError::Missing(format!("{name} (not in a struct)")));
        }
        let bitfields = info >> 31 == 1;
        for m in 0..(info & 0xffff) as usize {
            let at = start + TYPE_LEN + 12 * m;
            if self.name(u32_at(self.types, at)?) == name.as_bytes() {
                let offset = u32_at(self.types, at + 8)?;
                let bits = if bitfields {
                    offset & 0xff_ffff
                } else {
                    offset
                };
                return Ok((bits, u32_at(self.types, at + 4)?));
            }
        }
        Err(BtfError::Missing(format!("member {name}")))
    }

    /// Byte offset of the 4-byte field at `path` (members, outermost first) in struct
    /// `name`.
    ///
    /// # Errors
    /// A name is missing, a member isn't byte aligned, or the field isn't 4 bytes.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = self.find_struct(name)?;
        let mut bits = 0u32;
        for field in path {
            let (offset, ty) = self.member(id, field)?;
            bits = bits
                .checked_add(offset)
                .ok_or(BtfError::Format("offset overflow"))?;
            id = self.resolve(ty)?.0;
        }
        let (_, kind, size) = self.resolve(id)?;
        if !bits.is_multiple_of(8) || !matches!(kind, KIND_INT | KIND_STRUCT) || size != 4 {
            return Err(BtfError::Missing(format!(
                "{name}.{} as a 4-byte field",
                path.join(".")
            )));
        }
        Ok(bits / 8)
    }
}

/// Offset of `sk_rmem_alloc` (`sk_backlog.rmem_alloc`) in the running kernel's `struct sock`.
///
/// # Errors
/// The kernel has no BTF, or it doesn't describe the field as expected.
pub fn sock_rmem_offset() -> Result<u32, String> {
    let data = std::fs::read(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    Btf::parse(&data)
        .and_then(|b| b.offset_of("sock", &["sk_backlog", "rmem_alloc"]))
        .map_err(|e| format!("{VMLINUX_BTF}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob builder: strings and types in the kernel's layout.
    struct Blob {
        strings: Vec<u8>,
        types: Vec<u8>,
    }

    impl Blob {
        fn new() -> Blob {
            Blob {
                strings: vec![0],
                types: Vec::new(),
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            at
        }
        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_ne_bytes());
            }
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, bitfields: bool, size: u32) {
            let n = self.s(name);
            let info = (kind << 24) | vlen | (u32::from(bitfields) << 31);
            self.words(&[n, info, size]);
        }
        fn member(&mut self, name: &str, ty: u32, offset: u32) {
            let n = self.s(name);
            self.words(&[n, ty, offset]);
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_ne_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// `struct sock { long pad[3]; struct { atomic_t rmem_alloc; int len; } sk_backlog; }`
    /// with an enum, a function prototype and a bitfield struct before it, so that skipping
    /// is exercised.
    fn sock_blob(bitfields: bool) -> Vec<u8> {
        let mut b = Blob::new();
        b.ty("int", KIND_INT, 0, false, 4); // 1
        b.words(&[32]);
        b.ty("e", KIND_ENUM, 2, false, 4); // 2
        b.words(&[0, 0, 0, 1]);
        b.ty("", KIND_FUNC_PROTO, 1, false, 1); // 3
        b.words(&[0, 1]);
        b.ty("atomic_t", KIND_STRUCT, 1, false, 4); // 4
        b.member("counter", 1, 0);
        b.ty("", KIND_STRUCT, 2, bitfields, 8); // 5
        b.member("rmem_alloc", 6, 0);
        b.member("len", 1, if bitfields { (32 << 24) | 32 } else { 32 });
        b.ty("atomic_t", KIND_TYPEDEF, 0, false, 4); // 6: typedef → 4
        b.ty("long", KIND_INT, 0, false, 8); // 7
        b.words(&[64]);
        b.ty("", KIND_ARRAY, 0, false, 0); // 8
        b.words(&[7, 1, 3]);
        b.ty("sock", KIND_STRUCT, 2, false, 32); // 9
        b.member("pad", 8, 0);
        b.member("sk_backlog", 5, 192);
        b.bytes()
    }

    #[test]
    fn finds_a_nested_member_through_typedefs() {
        for bitfields in [false, true] {
            let data = sock_blob(bitfields);
            let btf = Btf::parse(&data).unwrap();
            assert_eq!(btf.offset_of("sock", &["sk_backlog", "rmem_alloc"]), Ok(24));
            assert_eq!(btf.offset_of("sock", &["sk_backlog", "len"]), Ok(28));
        }
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let data = sock_blob(false);
        let btf = Btf::parse(&data).unwrap();
        assert!(matches!(
            btf.offset_of("sock", &["sk_backlog", "nothing"]),
            Err(BtfError::Missing(_))
        ));
        assert!(matches!(
            btf.offset_of("socket", &["sk_backlog"]),
            Err(BtfError::Missing(_))
        ));
        // An 8-byte field isn't what the program reads.
        assert!(matches!(
            btf.offset_of("sock", &["sk_backlog"]),
            Err(BtfError::Missing(_))
        ));
        assert_eq!(
            Btf::parse(&data[..data.len() - 9]).err(),
            Some(BtfError::Format("truncated"))
        );
        assert_eq!(
            Btf::parse(b"\x00\x00not btf at all........").err(),
            Some(BtfError::Format("bad magic"))
        );
        let mut unknown = Blob::new();
        unknown.ty("x", 31, 0, false, 0);
        assert_eq!(Btf::parse(&unknown.bytes()).err(), Some(BtfError::Kind(31)));
    }

    /// The running kernel's own BTF, when it has one: the offset is inside `struct sock`
    /// and the same as a second look finds.
    #[test]
    fn reads_the_running_kernel() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("no {VMLINUX_BTF}; skipped");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let offset = btf
            .offset_of("sock", &["sk_backlog", "rmem_alloc"])
            .unwrap();
        let (_, _, _, size) = btf.header(btf.find_struct("sock").unwrap()).unwrap();
        assert!(offset > 0 && offset + 4 <= size, "{offset} in {size}");
        assert_eq!(sock_rmem_offset(), Ok(offset));
        eprintln!("sk_rmem_alloc at byte {offset} of {size}");
    }
}
