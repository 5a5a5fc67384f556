//! The `.json` manifest sidecar reader (`core/src/manifest.rs`) and the layout checks a
//! restore runs on what it reads (`core/src/layout.rs`, as `pipeline::find_backup` does).
//! Properties:
//!
//! - `Manifest::from_slice` errors or parses, never panics; an accepted manifest has this
//!   build's `MANIFEST_VERSION`, and it round-trips: `from_slice(to_json(m)) == m`;
//! - `stamp_of(datastore, file)`, if it finds a stamp, finds a calendar date at its start
//!   in a name ending in `.age` (it reads names from a folder listing: that they are one
//!   path component is the listing's doing, not its own);
//! - a companion accepted by `validate_companion` is one path component of the dated folder
//!   (no `/`, not hidden, no NUL), so a crafted manifest cannot point a restore elsewhere;
//! - a `date` accepted by `parse_date` is exactly `YYYY-MM-DD`.
#![no_main]

use ferry_core::layout;
use ferry_core::manifest::{MANIFEST_VERSION, Manifest};
use ferry_fuzz::{is_calendar_date, is_single_component};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::from_slice("fuzz.age.json", data) else {
        return;
    };
    assert_eq!(m.manifest_version, MANIFEST_VERSION);
    let json = m.to_json();
    let back = Manifest::from_slice("rewritten.json", &json)
        .unwrap_or_else(|e| panic!("a manifest written by to_json is refused: {e}"));
    assert_eq!(back, m, "the manifest does not round-trip");

    if let Some(stamp) = layout::stamp_of(&m.datastore, &m.file) {
        assert!(is_calendar_date(&stamp[..10]), "stamp {stamp:?}");
        assert!(m.file.ends_with(".age"));
    }
    for c in &m.companions {
        if layout::validate_companion(c).is_ok() {
            assert!(is_single_component(c), "companion {c:?}");
            assert!(!c.starts_with('.'), "companion {c:?} is hidden");
            assert!(c.ends_with(".age"), "companion {c:?}");
        }
    }
    if layout::parse_date(&m.date).is_ok() {
        assert!(is_calendar_date(&m.date), "date {:?}", m.date);
    }
});
