//! The bundled guest images (built from `guest/` by the build script) and resolution of a
//! `--guest NAME|PATH` argument.

use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The names of the bundled guests.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUNDLED.iter().map(|(n, _)| *n)
}

/// What a bundled guest is for, in a few words (most exist to test the VMM).
pub fn purpose(name: &str) -> &'static str {
    match name {
        "kv" => {
            "a Redis-compatible service, durable on its disk (needs --disk, --tap, --mac, --ip)"
        }
        "selftest" => "test guest: checks allocation, floating point, the clock and a wait",
        "crash" => "test guest: touches an unmapped address (the crash report)",
        "hostile" => "test guest: abuses the VMM's interfaces, then waits forever",
        "spin" => "test guest: computes forever without an exit",
        "exitbench" => "test guest: the cost of exits (benchmarks)",
        "clockwork" => "test guest: diverges at once if any input is not replayed faithfully",
        "badvirtio" => "test guest: malformed virtio requests the VMM must survive",
        "diskwait" => "test guest: block reads taken at WAITs (needs --disk)",
        "timecheck" => "test guest: checks its clocks never go backwards (across failovers)",
        _ => "",
    }
}

/// The image of a bundled guest.
pub fn bundled(name: &str) -> Option<&'static [u8]> {
    BUNDLED.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// A guest image and where it came from.
pub struct GuestImage {
    /// How to name it in messages.
    pub label: String,
    /// The ELF bytes.
    pub bytes: std::borrow::Cow<'static, [u8]>,
}

/// Resolves `--guest`: a bundled name, or a path to an ELF file (anything with a `/` or that
/// exists as a file).
pub fn resolve(spec: &str) -> Result<GuestImage, String> {
    let path = Path::new(spec);
    if spec.contains('/') || path.is_file() {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read guest image {spec}: {e}"))?;
        return Ok(GuestImage {
            label: spec.to_string(),
            bytes: bytes.into(),
        });
    }
    match bundled(spec) {
        Some(b) => Ok(GuestImage {
            label: spec.to_string(),
            bytes: b.into(),
        }),
        None => Err(format!(
            "no bundled guest named {spec:?} and no such file (bundled: {})",
            names().collect::<Vec<_>>().join(", ")
        )),
    }
}
