//! Hash slots: CRC16 of the key (or of its hash tag) modulo 16384.

/// Number of hash slots in a Redis Cluster.
pub const SLOT_COUNT: usize = 16384;

/// A hash slot. Type invariant: the value is below [`SLOT_COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub(super) u16);

impl Slot {
    /// The slot `n`, if it is in range.
    pub fn new(n: u16) -> Option<Slot> {
        (usize::from(n) < SLOT_COUNT).then_some(Slot(n))
    }

    /// The slot of `key`: CRC16/XMODEM of its hash tag (or of the whole key) modulo 16384.
    pub fn for_key(key: &[u8]) -> Slot {
        let crc = crc16::State::<crc16::XMODEM>::calculate(hash_tag(key));
        Slot(crc % SLOT_COUNT as u16)
    }

    /// The slot number.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// The part of `key` that is hashed: the bytes between the first `{` and the first `}` after
/// it, if that is not empty; otherwise the whole key (cluster spec, "Hash tags").
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}')
            && close > 0
        {
            return &rest[..close];
        }
    }
    key
}
