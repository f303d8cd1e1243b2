//! Comparing two XSAVE areas by what they hold for the guest, not byte for byte.
//!
//! An XSAVE area (`KVM_GET_XSAVE`, standard format) carries each state component's registers
//! and, in its header, XSTATE_BV: a bit per component, clear when the component is in its
//! initial configuration. A clear bit and a set bit over the initial values mean the same
//! state: XRSTOR loads the initial values either way. Which one a save produces is up to the
//! processor's init tracking (XINUSE), which the guest cannot observe and which differs
//! between two machines that ran the same instructions: measured here, a saved and restored
//! replay ends with XSTATE_BV 0x2 where the original ends with 0x3, every register equal.
//! [`differences`] therefore compares each component's *effective* value: its bytes when its
//! bit is set, its initial value when it is clear.

use std::ops::Range;

/// Offset of XSTATE_BV in the XSAVE header.
const XSTATE_BV: usize = 512;
/// The initial x87 control word (FNINIT's): all exceptions masked, 64-bit precision.
const FCW_INIT: [u8; 2] = 0x037f_u16.to_le_bytes();

/// One state component's place in a standard-format XSAVE area.
struct Component {
    /// The XSTATE_BV bit.
    bit: u32,
    /// What the differences call it.
    name: String,
    /// Its bytes in the area.
    range: Range<usize>,
}

/// The components this processor saves in an area of `len` bytes: x87 and SSE in the legacy
/// region, the extended ones where CPUID leaf 0xD puts them.
fn components(len: usize) -> Vec<Component> {
    let mut v = vec![
        // x87 in two parts, FCW..FDP and ST0-ST7: MXCSR (bytes 24..32) lies between them.
        Component {
            bit: 0,
            name: "x87 control".into(),
            range: 0..24,
        },
        Component {
            bit: 0,
            name: "x87 ST0-7".into(),
            range: 32..160,
        },
        Component {
            bit: 1,
            name: "SSE (XMM0-15)".into(),
            range: 160..416,
        },
    ];
    for (bit, range) in extended_components() {
        if range.end <= len {
            v.push(Component {
                bit,
                name: format!("component {bit}"),
                range,
            });
        }
    }
    v
}

/// The extended components (bit 2 and up) that XCR0 may enable here, with their offsets and
/// sizes in the standard format (CPUID leaf 0xD, sub-leaf = bit: EAX size, EBX offset).
#[cfg(target_arch = "x86_64")]
fn extended_components() -> Vec<(u32, Range<usize>)> {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 0xD exists wherever XSAVE does, and KVM_GET_XSAVE (the only source of these
    // areas) requires XSAVE.
    let supported = __cpuid_count(0xd, 0);
    let mask = u64::from(supported.eax) | (u64::from(supported.edx) << 32);
    (2..63)
        .filter(|bit| mask & (1 << bit) != 0)
        .filter_map(|bit| {
            let c = __cpuid_count(0xd, bit);
            // ECX bit 0 marks a supervisor component (IA32_XSS), never in a standard area.
            let user = c.ecx & 1 == 0;
            (user && c.eax > 0).then(|| (bit, c.ebx as usize..(c.ebx + c.eax) as usize))
        })
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn extended_components() -> Vec<(u32, Range<usize>)> {
    Vec::new()
}

/// The initial value of byte `i` of a component (all zero but x87's control word).
fn initial(bit: u32, i: usize) -> u8 {
    match (bit, i) {
        (0, 0) => FCW_INIT[0],
        (0, 1) => FCW_INIT[1],
        _ => 0,
    }
}

/// The bit of component `bit` in the area's XSTATE_BV (clear in an area too short to hold it).
fn in_use(area: &[u8], bit: u32) -> bool {
    area.get(XSTATE_BV + bit as usize / 8)
        .is_some_and(|b| b & (1 << (bit % 8)) != 0)
}

/// The byte `i` that XRSTOR of `area` would load for component `bit`.
fn effective(area: &[u8], bit: u32, i: usize) -> Option<u8> {
    if in_use(area, bit) {
        area.get(i).copied()
    } else {
        Some(initial(bit, i))
    }
}

/// Where two XSAVE areas give the guest different state: the names of the components whose
/// effective values differ, MXCSR, and the length if the areas differ in size. Empty when
/// restoring either would leave the vCPU in the same state.
pub fn differences(a: &[u8], b: &[u8]) -> Vec<String> {
    let mut d = Vec::new();
    if a.len() != b.len() {
        d.push(format!("length {} vs {}", a.len(), b.len()));
        return d;
    }
    // MXCSR and its mask are loaded whenever SSE or AVX is restored, whatever XSTATE_BV says.
    if a.get(24..32) != b.get(24..32) {
        d.push("MXCSR".into());
    }
    for c in components(a.len()) {
        let same = c
            .range
            .clone()
            .all(|i| effective(a, c.bit, i) == effective(b, c.bit, i));
        if !same {
            d.push(c.name);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::XSAVE_BYTES;

    /// An area as a save of a vCPU with every component in its initial state would give.
    fn initial_area(bv: u8) -> Vec<u8> {
        let mut a = vec![0u8; XSAVE_BYTES];
        a[0..2].copy_from_slice(&FCW_INIT);
        a[24..28].copy_from_slice(&0x1f80_u32.to_le_bytes());
        a[XSTATE_BV] = bv;
        a
    }

    #[test]
    fn a_component_in_its_initial_state_is_the_same_with_its_bit_set_or_clear() {
        // The case measured on this host: x87 initial, its bit set in one save only.
        assert!(differences(&initial_area(0x2), &initial_area(0x3)).is_empty());
        assert!(differences(&initial_area(0), &initial_area(0x7)).is_empty());
    }

    #[test]
    fn registers_that_differ_are_found_whatever_the_header_says() {
        let mut a = initial_area(0x3);
        let b = initial_area(0x3);
        a[160 + 15 * 16 + 3] ^= 0x5a; // XMM15
        assert_eq!(differences(&a, &b), ["SSE (XMM0-15)"]);
        // The same register bytes under a clear bit are not loaded: the initial zeros are.
        let mut c = a.clone();
        c[XSTATE_BV] = 0x1;
        assert_eq!(differences(&a, &c), ["SSE (XMM0-15)"]);
        assert!(differences(&c, &b).is_empty());
        let mut e = b.clone();
        e[32] = 1; // ST0
        assert_eq!(differences(&e, &b), ["x87 ST0-7"]);
        let mut f = b.clone();
        f[0] = 0x7e; // FCW, set against a clear bit: differs from the initial 0x37f
        f[XSTATE_BV] = 0x3;
        let mut g = b.clone();
        g[XSTATE_BV] = 0x2;
        assert_eq!(differences(&f, &g), ["x87 control"]);
    }

    #[test]
    fn mxcsr_and_length_are_compared_apart_from_the_header() {
        let mut a = initial_area(0);
        let b = initial_area(0);
        a[24] = 0;
        assert_eq!(differences(&a, &b), ["MXCSR"]);
        assert_eq!(differences(&b, &b[..100]), ["length 4096 vs 100"]);
    }

    #[test]
    fn an_extended_component_that_differs_is_named() {
        let Some((bit, range)) = extended_components()
            .into_iter()
            .find(|(_, r)| r.end <= XSAVE_BYTES)
        else {
            eprintln!("SKIPPED: this processor saves no extended XSAVE component");
            return;
        };
        let mut a = initial_area(0);
        a[XSTATE_BV + bit as usize / 8] |= 1 << (bit % 8);
        let b = initial_area(0);
        assert!(differences(&a, &b).is_empty(), "zeros under a set bit");
        a[range.start] = 9;
        assert_eq!(differences(&a, &b), [format!("component {bit}")]);
    }
}
