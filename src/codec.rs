//! The object codec: plaintext -> sha256 -> zstd -> age (X25519), and the verified reverse.
//!
//! Owns the bytes of one stored object; knows nothing of storage, WAL or PostgreSQL.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "WSHP"
//!      4     1  format version (1)
//!      5     1  flags: bit 0 zstd, bit 1 age; both always set in version 1
//!      6     2  reserved, zero
//!      8     8  plaintext size, little endian
//!     16    32  plaintext sha256
//!     48     …  age(zstd(plaintext))
//! ```
//!
//! The header is in the clear so that a duplicate push is decided by reading 48 bytes, without the
//! identity. It is not trusted on the way back: decoding recomputes size and sha256 of what comes
//! out of age and zstd and fails if they differ, and age's AEAD fails on any flipped or missing byte.
//! Decoding writes into a caller's sink that must not be treated as valid until `decode` returns Ok.

use std::io::{self, Read, Write};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 4] = b"WSHP";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
const FLAG_ZSTD: u8 = 1;
const FLAG_AGE: u8 = 2;
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a walship object (bad magic or header); the object may be corrupt or written by another tool")]
    BadHeader,
    #[error(
        "walship object format version {0} is newer than this walship understands; upgrade walship"
    )]
    UnsupportedVersion(u8),
    #[error("cannot decrypt: {0}; check that the identity file matches a recipient the repository was written for (or the object's key stanza is damaged)")]
    Decrypt(String),
    #[error("object is corrupt: {0}; restore an intact earlier version of it if the bucket is versioned (for a backup, `walship backup-list` shows the others to restore instead)")]
    Corrupt(String),
    #[error("invalid age recipient '{0}': expected an age1… public key")]
    BadRecipient(String),
    /// A secret key where a public one belongs; the key itself is never repeated in the message.
    #[error("a secret age identity (AGE-SECRET-KEY-1…) was given as a recipient: give its public key instead (age1…, printed by `walship keygen`; `age-keygen -y` derives it), keep the secret key only on hosts that fetch, and treat this one as exposed if it was typed where others can see it")]
    SecretAsRecipient,
    #[error("no age identity (AGE-SECRET-KEY-1…) found in {0}: point identity_file (or WALSHIP_IDENTITY_FILE) at the secret key file `walship keygen` wrote, not at the public age1… key")]
    NoIdentity(String),
    #[error("encrypting failed: {0}")]
    Encrypt(String),
    #[error("I/O error while coding: {0}")]
    Io(#[from] io::Error),
}

impl CodecError {
    /// Whether a download that failed to decode might decode when made again: damage might be the
    /// transfer's (plain http, a faulty proxy). Damage can pass for any decode failure: a flip in
    /// age's recipient stanza reads as a wrong key, one in the version byte as a newer format.
    pub fn may_be_transfer_damage(&self) -> bool {
        matches!(
            self,
            CodecError::BadHeader
                | CodecError::UnsupportedVersion(_)
                | CodecError::Decrypt(_)
                | CodecError::Corrupt(_)
        )
    }
}

/// The fixed-size header in front of every object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub plain_size: u64,
    pub plain_sha256: [u8; 32],
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = FORMAT_VERSION;
        b[5] = FLAG_ZSTD | FLAG_AGE;
        b[8..16].copy_from_slice(&self.plain_size.to_le_bytes());
        b[16..48].copy_from_slice(&self.plain_sha256);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        if b.len() < HEADER_LEN || &b[..4] != MAGIC {
            return Err(CodecError::BadHeader);
        }
        if b[4] != FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion(b[4]));
        }
        if b[5] != FLAG_ZSTD | FLAG_AGE || b[6] != 0 || b[7] != 0 {
            return Err(CodecError::BadHeader);
        }
        let plain_size = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let plain_sha256 = b[16..48].try_into().expect("32 bytes");
        Ok(Self {
            plain_size,
            plain_sha256,
        })
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.plain_sha256)
    }
}

/// Public keys objects are encrypted to. Pushing needs only these.
#[derive(Clone)]
pub struct Recipients(Vec<age::x25519::Recipient>);

impl Recipients {
    pub fn parse<'a>(list: impl IntoIterator<Item = &'a str>) -> Result<Self, CodecError> {
        let mut out = Vec::new();
        for r in list {
            let r = r.trim();
            if r.is_empty() || r.starts_with('#') {
                continue;
            }
            if r.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
                return Err(CodecError::SecretAsRecipient);
            }
            out.push(age::x25519::Recipient::from_str(r).map_err(|_| {
                // Echo enough to find the value, not a whole value that may be some other secret.
                let shown: String = r.chars().take(16).collect();
                let more = if shown.len() < r.len() { "…" } else { "" };
                CodecError::BadRecipient(format!("{shown}{more}"))
            })?);
        }
        Ok(Self(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Short stable fingerprints, recorded in the repository so a push with other keys is refused.
    pub fn fingerprints(&self) -> Vec<String> {
        let mut fps: Vec<String> = self.0.iter().map(|r| fingerprint(&r.to_string())).collect();
        fps.sort();
        fps.dedup();
        fps
    }
}

pub fn fingerprint(recipient: &str) -> String {
    hex::encode(&Sha256::digest(recipient.as_bytes())[..8])
}

/// Secret keys that open objects. Only restoring hosts hold them.
pub struct Identities(Vec<age::x25519::Identity>);

impl Identities {
    /// Parse an age identity file (the format `age-keygen` and `walship keygen` write).
    pub fn parse(text: &str, origin: &str) -> Result<Self, CodecError> {
        let ids: Vec<_> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .filter_map(|l| age::x25519::Identity::from_str(l).ok())
            .collect();
        if ids.is_empty() {
            return Err(CodecError::NoIdentity(origin.to_string()));
        }
        Ok(Self(ids))
    }

    pub fn recipients(&self) -> Recipients {
        Recipients(self.0.iter().map(|i| i.to_public()).collect())
    }
}

/// A new identity and the text of its identity file.
pub fn generate_identity() -> (String, String) {
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let text = format!(
        "# created by walship keygen\n# public key: {public}\n{}\n",
        id.to_string().expose_secret()
    );
    (text, public)
}

/// What `encode` produced.
pub struct Encoded {
    pub header: Header,
    /// The whole object: header followed by the age payload.
    pub bytes: Vec<u8>,
}

/// Plaintext is compressed in independent zstd frames of this size: one-shot compression of a
/// frame is much faster than zstd's streaming encoder (about 50 against 77 ms for a 16 MiB pgbench
/// segment at level 1 on the benchmark machine) and memory stays bounded. Concatenated frames are
/// one valid zstd stream, so decoding is unchanged and format 1 still describes the object.
const FRAME: usize = 1 << 20;

/// Read until `buf` is full or the input ends; the number of bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Encode everything `input` yields. Memory: the encoded object plus one frame in and out.
pub fn encode(
    mut input: impl Read,
    recipients: &Recipients,
    level: i32,
) -> Result<Encoded, CodecError> {
    if recipients.is_empty() {
        return Err(CodecError::Encrypt("no recipients configured".into()));
    }
    let mut out = Vec::with_capacity(1 << 20);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let encryptor =
        age::Encryptor::with_recipients(recipients.0.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| CodecError::Encrypt(e.to_string()))?;
    let mut age_writer = encryptor.wrap_output(&mut out)?;
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; FRAME];
    // One output buffer for every frame, rather than a new allocation per frame.
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(FRAME));
    loop {
        let n = read_full(&mut input, &mut buf)?;
        // An empty input still gets one (empty) frame: a zstd stream has at least one.
        if n > 0 || size == 0 {
            hasher.update(&buf[..n]);
            frame.clear();
            compressor.compress_to_buffer(&buf[..n], &mut frame)?;
            age_writer.write_all(&frame)?;
            size += n as u64;
        }
        if n < FRAME {
            break;
        }
    }
    age_writer.finish()?;
    let header = Header {
        plain_size: size,
        plain_sha256: hasher.finalize().into(),
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(Encoded { header, bytes: out })
}

/// sha256 and size of a plaintext, the way `encode` computes them.
pub fn digest(mut input: impl Read) -> io::Result<Header> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Header {
        plain_size: size,
        plain_sha256: hasher.finalize().into(),
    })
}

/// Decode a whole object into `sink`, verifying AEAD, size and sha256. On error the sink holds
/// garbage and must be discarded.
///
/// Frames `encode` wrote (they record a content size of at most `FRAME`) are decompressed one-shot
/// straight into the output buffer, which costs about a tenth less CPU than zstd's streaming
/// decoder with its window copy. Any other frame (no recorded size, a bigger one, or more than
/// `4 * FRAME` compressed bytes without a frame end) is streamed, so memory stays bounded.
pub fn decode(
    object: &[u8],
    identities: &Identities,
    mut sink: impl Write,
) -> Result<Header, CodecError> {
    let header = Header::parse(object)?;
    // Only "no identity opens it" is a key problem; a header that fails its MAC or cannot be
    // parsed is damage, like any other.
    let age_error = |e: age::DecryptError| match e {
        age::DecryptError::NoMatchingKeys => CodecError::Decrypt(e.to_string()),
        // One line: some of age's messages add advice on a line of its own.
        e => CodecError::Corrupt(format!("age: {}", crate::text::one_line(&e.to_string()))),
    };
    let decryptor = age::Decryptor::new(&object[HEADER_LEN..]).map_err(age_error)?;
    let mut plain = decryptor
        .decrypt(identities.0.iter().map(|i| i as &dyn age::Identity))
        .map_err(age_error)?;
    let mut check = Check {
        hasher: Sha256::new(),
        size: 0,
        expect: header.plain_size,
        expect_sha: header.plain_sha256,
    };
    let mut out = vec![0u8; FRAME];
    let mut dctx = zstd::bulk::Decompressor::new()?;
    // Decrypted, still compressed bytes; `comp[start..]` is not decoded yet.
    let mut comp: Vec<u8> = Vec::with_capacity(2 * FRAME);
    let mut start = 0;
    let mut eof = false;
    loop {
        let pending = &comp[start..];
        let whole = match pending.is_empty() {
            true => None,
            false => zstd::zstd_safe::find_frame_compressed_size(pending).ok(),
        };
        match whole {
            Some(len) => {
                let frame = &pending[..len];
                match zstd::zstd_safe::get_frame_content_size(frame) {
                    Ok(Some(n)) if n as usize <= FRAME => {
                        let n = n as usize;
                        let got = dctx
                            .decompress_to_buffer(frame, &mut out[..n])
                            .map_err(|e| CodecError::Corrupt(format!("zstd: {e}")))?;
                        if got != n {
                            return Err(CodecError::Corrupt(format!(
                                "a zstd frame decoded to {got} bytes, its header says {n}"
                            )));
                        }
                        check.emit(&out[..n], &mut sink)?;
                    }
                    _ => stream_frames(frame, &mut out, &mut check, &mut sink)?,
                }
                start += len;
            }
            None if eof && pending.is_empty() => break,
            None if eof => {
                return Err(CodecError::Corrupt(
                    "the compressed stream ends inside a frame".into(),
                ))
            }
            None if pending.len() > 4 * FRAME => {
                // Not one of ours: stream the rest rather than buffer a frame of any size.
                let rest = io::Read::chain(pending, &mut plain);
                stream_frames(rest, &mut out, &mut check, &mut sink)?;
                eof = true;
                start = comp.len();
            }
            None => {
                comp.drain(..start);
                start = 0;
                let old = comp.len();
                comp.resize(old + CHUNK, 0);
                // age reports a failed AEAD tag or a truncated stream as InvalidData.
                let n = read_full(&mut plain, &mut comp[old..])
                    .map_err(|e| CodecError::Corrupt(e.to_string()))?;
                comp.truncate(old + n);
                eof = n < CHUNK;
            }
        }
    }
    check.finish()?;
    Ok(header)
}

/// Stream-decode every zstd frame `input` yields.
fn stream_frames(
    input: impl Read,
    buf: &mut [u8],
    check: &mut Check,
    sink: &mut impl Write,
) -> Result<(), CodecError> {
    let mut decoder = zstd::stream::read::Decoder::new(input)?;
    loop {
        match decoder.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => check.emit(&buf[..n], sink)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CodecError::Corrupt(e.to_string())),
        }
    }
}

/// Size and sha256 of what decoding yields, against the header's record.
struct Check {
    hasher: Sha256,
    size: u64,
    expect: u64,
    expect_sha: [u8; 32],
}

impl Check {
    fn emit(&mut self, bytes: &[u8], sink: &mut impl Write) -> Result<(), CodecError> {
        self.size += bytes.len() as u64;
        if self.size > self.expect {
            return Err(CodecError::Corrupt(format!(
                "more than the recorded {} bytes",
                self.expect
            )));
        }
        self.hasher.update(bytes);
        sink.write_all(bytes)?;
        Ok(())
    }

    fn finish(self) -> Result<(), CodecError> {
        if self.size != self.expect {
            return Err(CodecError::Corrupt(format!(
                "{} bytes decoded, {} recorded",
                self.size, self.expect
            )));
        }
        let sha: [u8; 32] = self.hasher.finalize().into();
        if sha != self.expect_sha {
            return Err(CodecError::Corrupt(
                "sha256 of the decoded content does not match the recorded one".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Identities, Recipients) {
        let (text, _) = generate_identity();
        let ids = Identities::parse(&text, "test").unwrap();
        let rec = ids.recipients();
        (ids, rec)
    }

    fn pseudo_random(n: usize) -> Vec<u8> {
        // xorshift: compressible enough to be realistic, no dependency.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    0
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn round_trip(data: &[u8]) {
        let (ids, rec) = keys();
        let enc = encode(data, &rec, 3).unwrap();
        assert_eq!(enc.header.plain_size, data.len() as u64);
        assert_eq!(enc.header, digest(data).unwrap());
        let mut out = Vec::new();
        let h = decode(&enc.bytes, &ids, &mut out).unwrap();
        assert_eq!(h, enc.header);
        assert_eq!(out, data);
    }

    #[test]
    fn round_trips_empty_one_byte_and_a_segment() {
        round_trip(b"");
        round_trip(b"x");
        round_trip(&pseudo_random(16 * 1024 * 1024));
        // Around the frame size: exactly one frame, one byte into the second.
        round_trip(&pseudo_random(FRAME));
        round_trip(&pseudo_random(FRAME + 1));
    }

    #[test]
    fn wrong_key_is_a_decrypt_error() {
        let (_, rec) = keys();
        let (other, _) = keys();
        let enc = encode(&b"hello"[..], &rec, 3).unwrap();
        let err = decode(&enc.bytes, &other, Vec::new()).unwrap_err();
        assert!(matches!(err, CodecError::Decrypt(_)), "{err}");
    }

    #[test]
    fn truncation_and_flipped_bits_are_detected() {
        let (ids, rec) = keys();
        let data = pseudo_random(300_000);
        let enc = encode(&data[..], &rec, 3).unwrap();
        for cut in [
            HEADER_LEN - 1,
            HEADER_LEN + 10,
            enc.bytes.len() / 2,
            enc.bytes.len() - 1,
        ] {
            assert!(
                decode(&enc.bytes[..cut], &ids, Vec::new()).is_err(),
                "truncated at {cut}"
            );
        }
        // In age's header (its MAC), the payload, the last chunk's tag: damage, not a key problem.
        for pos in [HEADER_LEN + 200, enc.bytes.len() / 2, enc.bytes.len() - 5] {
            let mut bad = enc.bytes.clone();
            bad[pos] ^= 0x01;
            let err = decode(&bad, &ids, Vec::new()).unwrap_err();
            assert!(
                matches!(err, CodecError::Corrupt(_)),
                "flip at {pos}: {err}"
            );
        }
        // A header that lies about the content is caught by the recomputed sha256.
        let mut bad = enc.bytes.clone();
        bad[20] ^= 0xFF;
        let err = decode(&bad, &ids, Vec::new()).unwrap_err();
        assert!(matches!(err, CodecError::Corrupt(_)), "{err}");
        let mut bad = enc.bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode(&bad, &ids, Vec::new()),
            Err(CodecError::BadHeader)
        ));
    }

    #[test]
    fn header_round_trip_and_version_gate() {
        let h = Header {
            plain_size: 16 << 20,
            plain_sha256: [7; 32],
        };
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        let mut b = h.to_bytes();
        b[4] = 9;
        assert!(matches!(
            Header::parse(&b),
            Err(CodecError::UnsupportedVersion(9))
        ));
    }

    #[test]
    fn fixture_from_format_version_1_still_decodes() {
        let ids = Identities::parse(include_str!("../tests/fixtures/v1-identity.txt"), "fixture")
            .unwrap();
        let object = include_bytes!("../tests/fixtures/v1-object.bin");
        let mut out = Vec::new();
        decode(object, &ids, &mut out).unwrap();
        assert_eq!(out, b"walship format version 1 fixture\n");
    }

    /// An object in the same format whose zstd part another encoder wrote: `frames` as given.
    fn object_with_frames(data: &[u8], rec: &Recipients, zstd_part: Vec<u8>) -> Vec<u8> {
        let header = digest(data).unwrap();
        let mut out = header.to_bytes().to_vec();
        let encryptor =
            age::Encryptor::with_recipients(rec.0.iter().map(|r| r as &dyn age::Recipient))
                .unwrap();
        let mut w = encryptor.wrap_output(&mut out).unwrap();
        w.write_all(&zstd_part).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn frames_without_a_recorded_size_or_bigger_than_ours_decode_streaming() {
        let (ids, rec) = keys();
        // Incompressible, so the single frame is bigger than the one-shot buffer limit.
        let mut x = 1u64;
        let data: Vec<u8> = (0..5 * FRAME + 7)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        // zstd's streaming encoder records no content size.
        let streamed = zstd::stream::encode_all(&data[..], 1).unwrap();
        assert!(streamed.len() > 4 * FRAME);
        // One small frame with a size, then a frame bigger than FRAME with its size.
        let mut mixed = zstd::bulk::compress(&data[..100], 1).unwrap();
        mixed.extend(zstd::bulk::compress(&data[100..], 1).unwrap());
        for zstd_part in [streamed, mixed] {
            let object = object_with_frames(&data, &rec, zstd_part);
            let mut out = Vec::new();
            decode(&object, &ids, &mut out).unwrap();
            assert!(out == data);
            // Still verified: a wrong recorded sha256 fails.
            let mut bad = object.clone();
            bad[20] ^= 1;
            assert!(matches!(
                decode(&bad, &ids, Vec::new()),
                Err(CodecError::Corrupt(_))
            ));
        }
        // A stream that stops inside a frame.
        let mut cut = zstd::bulk::compress(&data[..1000], 1).unwrap();
        cut.truncate(cut.len() - 3);
        let object = object_with_frames(&data[..1000], &rec, cut);
        assert!(matches!(
            decode(&object, &ids, Vec::new()),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn recipients_parse_and_fingerprint() {
        let (ids, rec) = keys();
        let text = rec.0[0].to_string();
        let parsed = Recipients::parse(["# comment", "", &text]).unwrap();
        assert_eq!(parsed.fingerprints(), ids.recipients().fingerprints());
        assert!(matches!(
            Recipients::parse(["age1nope"]),
            Err(CodecError::BadRecipient(_))
        ));
        // A secret key given by mistake (an identity file as recipients_file) is never echoed.
        let secret = ids.0[0].to_string();
        let err = Recipients::parse([secret.expose_secret()]).err().unwrap();
        assert!(matches!(err, CodecError::SecretAsRecipient));
        assert!(!err.to_string().contains(&secret.expose_secret()[15..]));
        let long = format!("{}x", "y".repeat(40));
        let err = Recipients::parse([long.as_str()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'yyyyyyyyyyyyyyyy…'"), "{err}");
        assert!(matches!(
            Identities::parse("nothing", "f"),
            Err(CodecError::NoIdentity(_))
        ));
    }
}
