//! An age file as `agex decrypt` / activation read it: the strict header reader, the
//! armor, and a full decryption with the CCTV vectors' X25519 identity.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use agex_secrets::crypt;
use agex_secrets::header::{self, Header};
use agex_secrets::identity::{Identities, LoadedIdentity};
use libfuzzer_sys::fuzz_target;

/// The identity of the C2SP CCTV age vectors (tests/cctv), public test data.
const IDENTITY: &str = "AGE-SECRET-KEY-1EGTZVFFV20835NWYV6270LXYVK2VKNX2MMDKWYKLMGR48UAWX40Q2P2LM0";

fn identities() -> &'static Identities {
    static IDS: OnceLock<Identities> = OnceLock::new();
    IDS.get_or_init(|| {
        let identity = age::x25519::Identity::from_str(IDENTITY).expect("the CCTV identity parses");
        Identities {
            loaded: vec![LoadedIdentity {
                path: "cctv.key".into(),
                description: "X25519 cctv".into(),
                recipient: None,
                identity: Box::new(identity),
            }],
            skipped: Vec::new(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let known = BTreeMap::new();
    let parsed = Header::parse(data);
    if let Ok(h) = &parsed {
        let _ = h.summary();
        let _ = h.ssh_tags();
        let _ = crypt::describe_header(h, &known);
    }
    if let Ok(binary) = header::dearmor(data) {
        let _ = header::shape(&binary);
    }
    let decrypted = crypt::decrypt(Path::new("fuzz.age"), data, identities(), &known);
    // Whatever decrypts must have passed the strict header reader: the `age` crate
    // alone accepts headers the spec calls broken.
    if decrypted.is_ok() {
        assert!(
            parsed.is_ok(),
            "decrypted a file whose header agex rejects: {:?}",
            parsed.err()
        );
    }
});
