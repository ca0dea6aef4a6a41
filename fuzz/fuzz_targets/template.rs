//! Template text (`[templates.X] content`) parsed as at config load and rendered as at
//! activation, with a value for every secret it names.
#![no_main]

use std::collections::BTreeMap;

use agex_activate::activate::render;
use agex_activate::manifest::pieces;
use agex_core::template::Template;
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = Template::parse(text) else {
        return;
    };
    let names = template.secrets();
    let mut plaintexts = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        assert!(
            Template::find_placeholder(text, name).is_some(),
            "the placeholder of `{name}` is not found in its own template"
        );
        plaintexts.insert(
            name.to_string(),
            Zeroizing::new(format!("value{i}\r\n\n").into_bytes()),
        );
    }
    let rendered = render(&pieces(&template), &plaintexts).expect("every secret has a value");
    // Sized up front: a buffer that grew would have left unwiped copies of plaintext.
    assert_eq!(rendered.len(), rendered.capacity(), "the rendered buffer grew");
    if let Some(first) = names.first() {
        plaintexts.remove(*first);
        assert!(render(&pieces(&template), &plaintexts).is_err());
    }
});
