//! The main migration stream's framing: a header, device sections, RAM section
//! heads and an end marker, each section checked by CRC-32. The layout (and
//! what the sections mean) is documented in `python/cprfast/stream.py`, which
//! drives this code.
//!
//! Framing and parsing are native because a CPR switchover frames and parses
//! a device stream inside the guest's pause: one call per side instead of a
//! few dozen interpreter steps. For the reference VMM's three sections the
//! interpreted writer took 6–9 µs and the reader 17–27 µs hot, these 3–5 and
//! 5–7; on a cold cache, where everything around them costs more, 95–121 →
//! 79–98 µs and 164–219 → 139–141 µs.

use std::ops::Range;

use crate::error::{Error, Result};

/// The stream's first eight bytes.
pub const MAGIC: [u8; 8] = *b"CPRFMAIN";
/// The format version after the magic.
pub const VERSION: u32 = 1;
/// A section holding one device's state.
pub const KIND_DEVICE: u8 = 1;
/// A section after which a page stream follows.
pub const KIND_RAM: u8 = 2;
/// The end marker.
pub const KIND_END: u8 = 0xFF;
/// Longest section name, in bytes.
pub const MAX_NAME: usize = 256;
/// Largest device state, in bytes.
pub const MAX_SECTION: u64 = 256 << 20;

const HEADER_LEN: usize = 12;
/// instance u32, version u32, length u64.
const TAIL_LEN: usize = 16;
/// section count u32, crc u32.
const END_REST: usize = 8;
const CRC_LEN: usize = 4;

/// What a writer adds to the stream.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    /// One device's state.
    Device {
        /// Device name.
        name: &'a str,
        /// Instance id.
        instance: u32,
        /// State format version.
        version: u32,
        /// The state.
        payload: &'a [u8],
    },
    /// The head of a RAM section; the caller streams the pages after it.
    Ram {
        /// Region name.
        name: &'a str,
    },
}

/// The stream header.
#[must_use]
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&VERSION.to_be_bytes());
    h
}

fn section_head(out: &mut Vec<u8>, kind: u8, name: &str, instance: u32, version: u32, len: u64) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!("section name must be 1..{MAX_NAME} bytes: '{name}'")));
    }
    out.push(kind);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&instance.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Append `piece`, checksummed, to `out`.
pub fn frame(out: &mut Vec<u8>, piece: Piece<'_>) -> Result<()> {
    let start = out.len();
    match piece {
        Piece::Device { name, instance, version, payload } => {
            if payload.len() as u64 > MAX_SECTION {
                return Err(Error::InvalidArgument(format!(
                    "device '{name}' state is larger than {MAX_SECTION} bytes"
                )));
            }
            section_head(out, KIND_DEVICE, name, instance, version, payload.len() as u64)?;
            out.extend_from_slice(payload);
        }
        Piece::Ram { name } => section_head(out, KIND_RAM, name, 0, 1, 0)?,
    }
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Append the end marker, which counts the sections before it.
pub fn frame_end(out: &mut Vec<u8>, sections: u32) {
    let start = out.len();
    out.push(KIND_END);
    out.extend_from_slice(&sections.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// One element a [`Parser`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The stream header (magic and version checked).
    Header,
    /// A verified device section; `payload` indexes the buffer given to [`Parser::step`].
    Device {
        /// Device name.
        name: String,
        /// Instance id.
        instance: u32,
        /// State format version.
        version: u32,
        /// Where the state lies in the parsed buffer.
        payload: Range<usize>,
    },
    /// A verified RAM section head: its page stream follows in the input.
    Ram(String),
    /// The verified end marker: the stream is complete.
    End,
}

/// What the parser waits for when the input runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The piece being read, for the "truncated" message.
    pub what: String,
    /// Its length.
    pub len: usize,
    /// How much of it is there.
    pub have: usize,
}

impl Need {
    /// Bytes still missing.
    #[must_use]
    pub fn missing(&self) -> usize {
        self.len - self.have
    }

    /// The error for an input that ended here.
    #[must_use]
    pub fn truncated(&self) -> Error {
        Error::Corrupt(format!("main stream truncated while reading {} ({} of {} bytes)", self.what, self.have, self.len))
    }
}

/// A step of [`Parser::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An element and the bytes it took from the front of the buffer.
    Item(Item, usize),
    /// The buffer ends inside the next element.
    Need(Need),
}

/// Parses a main stream element by element from the front of a buffer, so the
/// caller may read exactly as much as the next element needs (a page stream
/// follows a RAM head on the same fd) or read ahead greedily.
#[derive(Debug, Default)]
pub struct Parser {
    started: bool,
    ended: bool,
    count: u32,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Python's `repr` of a plain name, as the messages show it.
fn quoted(name: &str) -> String {
    format!("'{name}'")
}

impl Parser {
    /// A parser at the start of a stream.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The end marker was parsed.
    #[must_use]
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Parse the next element from the front of `buf`; errors are [`Error::Corrupt`].
    pub fn step(&mut self, buf: &[u8]) -> Result<Step> {
        if self.ended {
            return Err(Error::InvalidArgument("the main stream has ended".into()));
        }
        let need = |what: &str, len: usize, have: usize| Ok(Step::Need(Need { what: what.into(), len, have }));
        if !self.started {
            if buf.len() < HEADER_LEN {
                return need("the stream header", HEADER_LEN, buf.len());
            }
            if buf[..8] != MAGIC {
                return Err(Error::Corrupt(format!("not a cprfast main stream (bad magic {})", py_bytes(&buf[..8]))));
            }
            let version = be_u32(&buf[8..12]);
            if version != VERSION {
                return Err(Error::Corrupt(format!(
                    "unsupported main stream version {version} (this cprfast reads {VERSION})"
                )));
            }
            self.started = true;
            return Ok(Step::Item(Item::Header, HEADER_LEN));
        }
        let rest = buf;
        let Some(&kind) = rest.first() else {
            return need("a section kind", 1, 0);
        };
        if kind == KIND_END {
            if rest.len() < 1 + END_REST {
                return need("the end marker", END_REST, rest.len() - 1);
            }
            let total = be_u32(&rest[1..5]);
            if be_u32(&rest[5..9]) != crc32fast::hash(&rest[..5]) {
                return Err(Error::Corrupt("main stream end marker is corrupt (checksum mismatch)".into()));
            }
            if total != self.count {
                return Err(Error::Corrupt(format!(
                    "main stream end marker counts {total} sections but {} arrived",
                    self.count
                )));
            }
            self.ended = true;
            return Ok(Step::Item(Item::End, 1 + END_REST));
        }
        if kind != KIND_DEVICE && kind != KIND_RAM {
            return Err(Error::Corrupt(format!("unknown main stream section kind {kind:#x}")));
        }
        if rest.len() < 3 {
            return need("a section name length", 2, rest.len() - 1);
        }
        let name_len = usize::from(be_u16(&rest[1..3]));
        if !(1..=MAX_NAME).contains(&name_len) {
            return Err(Error::Corrupt(format!("section name length {name_len} is out of range 1..{MAX_NAME}")));
        }
        if rest.len() < 3 + name_len {
            return need("a section name", name_len, rest.len() - 3);
        }
        let head_len = 3 + name_len + TAIL_LEN;
        if rest.len() < head_len {
            return need("a section header", TAIL_LEN, rest.len() - 3 - name_len);
        }
        let tail = &rest[3 + name_len..head_len];
        let (instance, version, len) = (be_u32(&tail[..4]), be_u32(&tail[4..8]), be_u64(&tail[8..]));
        if len > MAX_SECTION {
            return Err(Error::Corrupt(format!(
                "section length {len} exceeds the limit of {MAX_SECTION} bytes"
            )));
        }
        let name = std::str::from_utf8(&rest[3..3 + name_len])
            .map_err(|_| Error::Corrupt(format!("section name is not UTF-8: {}", py_bytes(&rest[3..3 + name_len]))))?
            .to_owned();
        let len = len as usize; // (at most MAX_SECTION)
        if rest.len() < head_len + len {
            return need(&format!("section {}", quoted(&name)), len, rest.len() - head_len);
        }
        let end = head_len + len + CRC_LEN;
        if rest.len() < end {
            let what = format!("the checksum of section {}", quoted(&name));
            return need(&what, CRC_LEN, rest.len() - head_len - len);
        }
        if be_u32(&rest[head_len + len..end]) != crc32fast::hash(&rest[..head_len + len]) {
            return Err(Error::Corrupt(format!("section {} is corrupt (checksum mismatch)", quoted(&name))));
        }
        self.count += 1;
        let item = if kind == KIND_RAM {
            Item::Ram(name)
        } else {
            Item::Device { name, instance, version, payload: head_len..head_len + len }
        };
        Ok(Step::Item(item, end))
    }

}

/// Python's `repr` of bytes (printable ASCII as is, the rest as `\xNN`), as the messages show them.
fn py_bytes(b: &[u8]) -> String {
    let mut s = String::from("b'");
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' => s.push_str("\\'"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            0x20..=0x7e => s.push(char::from(c)),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('\'');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(pieces: &[Piece<'_>]) -> Vec<u8> {
        let mut out = header().to_vec();
        for p in pieces {
            frame(&mut out, *p).unwrap();
        }
        frame_end(&mut out, pieces.len() as u32);
        out
    }

    /// Parse a whole stream held in memory: (items, or the first error or shortfall).
    fn parse_all(data: &[u8]) -> std::result::Result<Vec<Item>, String> {
        let mut p = Parser::new();
        let (mut pos, mut items) = (0, Vec::new());
        while !p.ended() {
            match p.step(&data[pos..]).map_err(|e| e.to_string())? {
                Step::Item(item, used) => {
                    items.push(match item {
                        Item::Device { name, instance, version, payload } => Item::Device {
                            name,
                            instance,
                            version,
                            payload: payload.start + pos..payload.end + pos,
                        },
                        other => other,
                    });
                    pos += used;
                }
                Step::Need(need) => return Err(need.truncated().to_string()),
            }
        }
        Ok(items)
    }

    const DEVICES: [Piece<'static>; 3] = [
        Piece::Device { name: "cprfast/run-state", instance: 0, version: 1, payload: b"running" },
        Piece::Device { name: "cpu", instance: 0, version: 1, payload: &[7; 300] },
        Piece::Ram { name: "pc.ram" },
    ];

    #[test]
    fn round_trip() {
        let data = stream(&DEVICES);
        let items = parse_all(&data).unwrap();
        assert_eq!(items.len(), 5);
        assert_eq!(items[0], Item::Header);
        let Item::Device { name, version, payload, .. } = &items[2] else { panic!("{:?}", items[2]) };
        assert_eq!((name.as_str(), *version, &data[payload.clone()]), ("cpu", 1, &[7u8; 300][..]));
        assert_eq!(items[3], Item::Ram("pc.ram".into()));
        assert_eq!(items[4], Item::End);
    }

    #[test]
    fn every_truncation_is_a_shortfall_and_every_flipped_byte_an_error() {
        let data = stream(&DEVICES);
        for cut in 0..data.len() {
            let err = parse_all(&data[..cut]).unwrap_err();
            assert!(err.starts_with("main stream truncated while reading "), "cut {cut}: {err}");
        }
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0x41;
            assert!(parse_all(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn error_texts() {
        let err = |d: &[u8]| parse_all(d).unwrap_err();
        assert_eq!(err(b"XXXXXXXX\0\0\0\x01"), "not a cprfast main stream (bad magic b'XXXXXXXX')");
        assert_eq!(err(b"CPRFMAIN\0\0\0\x09"), "unsupported main stream version 9 (this cprfast reads 1)");
        assert_eq!(err(b"CPRF"), "main stream truncated while reading the stream header (4 of 12 bytes)");
        let mut huge = header().to_vec();
        huge.extend_from_slice(&[1, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1]);
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(err(&huge), "section length 1099511627776 exceeds the limit of 268435456 bytes");
        let mut cut = stream(&DEVICES[1..2]);
        cut.truncate(12 + 3 + 3 + 16 + 4);
        assert_eq!(err(&cut), "main stream truncated while reading section 'cpu' (4 of 300 bytes)");
        assert_eq!(err(&[&header()[..], &[9]].concat()), "unknown main stream section kind 0x9");
        let mut long = Vec::new();
        assert!(frame(&mut long, Piece::Ram { name: &"n".repeat(MAX_NAME + 1) }).is_err());
        assert!(long.is_empty());
    }
}
