//! Server-side secrets and what they protect: code hashes, blind indexes and
//! phone-number encryption. Keys are prepared once at start; nothing here is
//! derived per request.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::domain::{Code, PhoneNumber, SubjectKey};

type HmacSha256 = Hmac<Sha256>;

/// An encrypted phone number and the id of the key that sealed it, so old keys
/// stay readable after rotation.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedPhone {
    pub key_id: u32,
    /// 24-byte nonce followed by ciphertext and tag.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for SealedPhone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedPhone(key {})", self.key_id)
    }
}

impl SealedPhone {
    /// One opaque byte string for stores: key id (big endian) ‖ blob.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.blob.len());
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&self.blob);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (id, blob) = bytes.split_first_chunk::<4>()?;
        Some(Self {
            key_id: u32::from_be_bytes(*id),
            blob: blob.to_vec(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("no phone key with id {0} is configured")]
    UnknownKey(u32),
    #[error("sealed data failed authentication")]
    Tampered,
    #[error("random source failed")]
    Random,
}

/// Material the keys are made from: one master secret, plus optional explicit keys.
pub struct KeyMaterial {
    pub master: Vec<u8>,
    pub code_key: Option<Vec<u8>>,
    /// Explicit phone keys by id. Key 1, unless given here, is derived from
    /// the master: the current key while none is given, readable after.
    pub phone_keys: BTreeMap<u32, Vec<u8>>,
    pub current_phone_key: Option<u32>,
}

pub struct Crypto {
    code_mac: HmacSha256,
    index_mac: HmacSha256,
    phone_ciphers: BTreeMap<u32, XChaCha20Poly1305>,
    current_phone_key: u32,
}

/// Lowercase hex, as `hex::encode` writes it, but by table into one buffer
/// instead of a `char` at a time: digests named in counter keys, Redis keys
/// and fields, several per send.
pub fn to_hex(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut out = vec![0; bytes.len() * 2];
    // The buffer is exactly twice the input, so this cannot fail.
    let _ = hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Whether a presented secret (a token, a callback secret) is the expected
/// one, in time that depends on neither's content nor length: their SHA-256
/// digests are compared in constant time.
pub fn secret_eq(expected: &str, presented: &str) -> bool {
    use sha2::Digest;
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.ct_eq(&b).into()
}

fn derive(master: &[u8], label: &str) -> [u8; 32] {
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit, so expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(b"otpd"), master).expand(label.as_bytes(), &mut okm);
    okm
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key length"),
    }
}

impl Crypto {
    pub fn new(material: &KeyMaterial) -> Result<Self, String> {
        let code_key = material
            .code_key
            .clone()
            .unwrap_or_else(|| derive(&material.master, "code-hash v1").to_vec());
        let mut phone_keys = material.phone_keys.clone();
        let current = material
            .current_phone_key
            .or_else(|| phone_keys.keys().next_back().copied())
            .unwrap_or(1);
        // Key 1 is derived from the master until keys are configured, and
        // stays readable after (unless key 1 itself is configured): numbers
        // sealed before the first explicit key must still open, and
        // `rotate-keys` re-seal them.
        phone_keys
            .entry(1)
            .or_insert_with(|| derive(&material.master, "phone-aead v1").to_vec());
        if !phone_keys.contains_key(&current) {
            return Err(format!(
                "secrets.current_phone_key: no key with id {current}"
            ));
        }
        let mut phone_ciphers = BTreeMap::new();
        for (id, key) in &phone_keys {
            let key32 = derive(key, "phone-aead key");
            let cipher = XChaCha20Poly1305::new_from_slice(&key32)
                .map_err(|_| format!("secrets.phone_keys.{id}: unusable key"))?;
            phone_ciphers.insert(*id, cipher);
        }
        Ok(Self {
            code_mac: mac(&code_key),
            index_mac: mac(&derive(&material.master, "blind-index v1")),
            phone_ciphers,
            current_phone_key: current,
        })
    }

    /// Keys derived from a fixed master; for tests and benchmarks only.
    pub fn for_tests() -> Self {
        let material = KeyMaterial {
            master: b"otpd test master secret, not for production".to_vec(),
            code_key: None,
            phone_keys: BTreeMap::new(),
            current_phone_key: None,
        };
        match Self::new(&material) {
            Ok(c) => c,
            Err(e) => unreachable!("fixed test keys are valid: {e}"),
        }
    }

    /// HMAC(code key, verification id ‖ code): binding to the id means a hash
    /// copied to another verification is worthless.
    pub fn code_hash(&self, verification_id: Uuid, code: &Code) -> [u8; 32] {
        let mut m = self.code_mac.clone();
        m.update(verification_id.as_bytes());
        m.update(code.expose().as_bytes());
        m.finalize().into_bytes().into()
    }

    /// HMAC(code key, "subject" ‖ subject ‖ code): the same code's hash keyed
    /// by the subject it was sent to, which a check by number knows before it
    /// knows the id. Redis keeps it beside `code_hash`, bound to the
    /// verification's id by its scripts, so that one script can find a
    /// subject's current verification and compare. The tag keeps it apart from
    /// every `code_hash`.
    pub fn subject_code_hash(&self, subject: &SubjectKey, code: &Code) -> [u8; 32] {
        let mut m = self.code_mac.clone();
        m.update(b"subject");
        m.update(&subject.0);
        m.update(code.expose().as_bytes());
        m.finalize().into_bytes().into()
    }

    pub fn hashes_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
        a.ct_eq(b).into()
    }

    /// A keyed, deterministic index over `parts`, separated so that
    /// ("ab","c") and ("a","bc") differ.
    pub fn blind_index(&self, domain: &str, parts: &[&str]) -> [u8; 32] {
        let mut m = self.index_mac.clone();
        m.update(domain.as_bytes());
        for p in parts {
            m.update(&[0]);
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p.as_bytes());
        }
        m.finalize().into_bytes().into()
    }

    pub fn subject_for_uid(&self, tenant: &str, uid: &str) -> SubjectKey {
        SubjectKey(self.blind_index("subject-uid", &[tenant, uid]))
    }

    /// The subject of a number in E.164 form.
    pub fn subject_for_phone(&self, tenant: &str, e164: &str, purpose: &str) -> SubjectKey {
        SubjectKey(self.blind_index("subject-phone", &[tenant, e164, purpose]))
    }

    /// Index of a number alone (inbox lookups, per-number limits).
    pub fn phone_index(&self, tenant: &str, phone: &PhoneNumber) -> [u8; 32] {
        self.blind_index("phone", &[tenant, phone.e164()])
    }

    pub fn current_phone_key(&self) -> u32 {
        self.current_phone_key
    }

    pub fn seal(&self, plaintext: &[u8]) -> Result<SealedPhone, CryptoError> {
        let key_id = self.current_phone_key;
        let cipher = self
            .phone_ciphers
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey(key_id))?;
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let ct = cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext)
            .map_err(|_| CryptoError::Tampered)?;
        let mut blob = Vec::with_capacity(24 + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Ok(SealedPhone { key_id, blob })
    }

    pub fn open(&self, sealed: &SealedPhone) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .phone_ciphers
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        if sealed.blob.len() < 24 {
            return Err(CryptoError::Tampered);
        }
        let (nonce, ct) = sealed.blob.split_at(24);
        cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| CryptoError::Tampered)
    }

    pub fn seal_phone(&self, phone: &PhoneNumber) -> Result<SealedPhone, CryptoError> {
        self.seal(phone.e164().as_bytes())
    }

    pub fn open_phone(&self, sealed: &SealedPhone) -> Result<PhoneNumber, CryptoError> {
        let bytes = self.open(sealed)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| CryptoError::Tampered)?;
        PhoneNumber::parse(text).map_err(|_| CryptoError::Tampered)
    }

    /// As `open_phone`, for a number of a stored verification whose country
    /// is known: skips re-validating it against the numbering plan.
    pub fn open_stored_phone(
        &self,
        sealed: &SealedPhone,
        country: Option<&str>,
    ) -> Result<PhoneNumber, CryptoError> {
        let bytes = self.open(sealed)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| CryptoError::Tampered)?;
        PhoneNumber::from_stored(text, country).ok_or(CryptoError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_what_the_hex_crate_writes() {
        for bytes in [&[][..], &[0x00, 0x0f, 0xa0, 0xff][..], &[7u8; 32][..]] {
            assert_eq!(to_hex(bytes), hex::encode(bytes));
        }
    }

    #[test]
    fn code_hash_is_bound_to_the_verification() {
        let c = Crypto::for_tests();
        let code = Code::parse("123456").unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_ne!(c.code_hash(a, &code), c.code_hash(b, &code));
        assert!(Crypto::hashes_match(
            &c.code_hash(a, &code),
            &c.code_hash(a, &code)
        ));
    }

    #[test]
    fn subject_code_hash_is_bound_to_the_subject_and_the_code() {
        let c = Crypto::for_tests();
        let (code, other) = (
            Code::parse("123456").unwrap(),
            Code::parse("123457").unwrap(),
        );
        let (a, b) = (SubjectKey([1; 32]), SubjectKey([2; 32]));
        assert_eq!(
            c.subject_code_hash(&a, &code),
            c.subject_code_hash(&a, &code)
        );
        assert_ne!(
            c.subject_code_hash(&a, &code),
            c.subject_code_hash(&b, &code)
        );
        assert_ne!(
            c.subject_code_hash(&a, &code),
            c.subject_code_hash(&a, &other)
        );
    }

    #[test]
    fn phone_round_trips_and_tampering_is_detected() {
        let c = Crypto::for_tests();
        let p = PhoneNumber::parse("+256700123456").unwrap();
        let mut sealed = c.seal_phone(&p).unwrap();
        assert!(!sealed.blob.windows(12).any(|w| w == b"256700123456"));
        assert_eq!(c.open_phone(&sealed).unwrap(), p);
        let restored = SealedPhone::from_bytes(&sealed.to_bytes()).unwrap();
        assert_eq!(restored, sealed);
        let last = sealed.blob.len() - 1;
        sealed.blob[last] ^= 1;
        assert!(c.open_phone(&sealed).is_err());
    }

    #[test]
    fn numbers_sealed_before_the_first_explicit_key_still_open() {
        let material = |keys: &[(u32, &str)], current: Option<u32>| KeyMaterial {
            master: b"a master secret".to_vec(),
            code_key: None,
            phone_keys: keys
                .iter()
                .map(|(id, k)| (*id, k.as_bytes().to_vec()))
                .collect(),
            current_phone_key: current,
        };
        let p = PhoneNumber::parse("+256700123456").unwrap();
        let first = Crypto::new(&material(&[], None)).unwrap();
        let sealed = first.seal_phone(&p).unwrap();
        assert_eq!(sealed.key_id, 1);

        // A first explicit key becomes current; the derived key 1 still opens.
        let rotated = Crypto::new(&material(&[(2, "second")], None)).unwrap();
        assert_eq!(rotated.current_phone_key(), 2);
        assert_eq!(rotated.open_phone(&sealed).unwrap(), p);
        assert_eq!(rotated.seal_phone(&p).unwrap().key_id, 2);
        // Even one numbered below it does not take key 1's place as current.
        let low = Crypto::new(&material(&[(0, "zero")], None)).unwrap();
        assert_eq!(low.current_phone_key(), 0);
        assert_eq!(low.open_phone(&sealed).unwrap(), p);
        // A configured key 1 is that key, not the derived one.
        let own = Crypto::new(&material(&[(1, "own")], None)).unwrap();
        assert!(own.open_phone(&sealed).is_err());
    }

    #[test]
    fn blind_index_separates_parts_and_tenants() {
        let c = Crypto::for_tests();
        assert_ne!(
            c.blind_index("d", &["ab", "c"]),
            c.blind_index("d", &["a", "bc"])
        );
        assert_ne!(c.subject_for_uid("t1", "u"), c.subject_for_uid("t2", "u"));
    }
}
