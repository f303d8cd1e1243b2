//! The fixed baseline CPUID table given to every guest: identical on every host, so that two
//! hosts with different CPUs present the same machine. RDRAND and RDSEED are absent. Its hash
//! is compared when a backup joins a primary. (On PVM, KVM lets some host feature bits through
//! regardless; the guest contract therefore forbids reading CPUID at all.)

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// (function, index, eax, ebx, ecx, edx) of every leaf.
const LEAVES: &[(u32, u32, u32, u32, u32, u32)] = &[
    // Max basic leaf 7; vendor "FTVMftvmFTVM" (ebx, edx, ecx).
    (0, 0, 7, 0x4d56_5446, 0x4d56_5446, 0x6d76_7466),
    // Family 6, fixed model; CLFLUSH line 8 qwords; x86-64 v1 features: FPU TSC MSR PAE CX8
    // PGE CMOV PAT CLFSH MMX FXSR SSE SSE2. No SSE3+, no RDRAND (ecx bit 30), no hypervisor bit.
    (
        1,
        0,
        0x0003_06c3,
        0x0000_0800,
        0,
        (1 << 0)
            | (1 << 4)
            | (1 << 5)
            | (1 << 6)
            | (1 << 8)
            | (1 << 13)
            | (1 << 15)
            | (1 << 16)
            | (1 << 19)
            | (1 << 23)
            | (1 << 24)
            | (1 << 25)
            | (1 << 26),
    ),
    // Structured extended features: none (no RDSEED, bit 18 of ebx).
    (7, 0, 0, 0, 0, 0),
    (0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
    // LAHF in 64-bit mode; SYSCALL, NX, LM.
    (0x8000_0001, 0, 0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)),
    // 39 physical, 48 virtual address bits.
    (0x8000_0008, 0, 0x3027, 0, 0, 0),
];

/// The baseline as KVM entries.
pub fn baseline() -> CpuId {
    let entries: Vec<kvm_cpuid_entry2> = LEAVES
        .iter()
        .map(|&(function, index, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries).expect("the baseline has few entries")
}

/// blake3 of the baseline table; two nodes pair only if theirs are equal.
pub fn baseline_hash() -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for &(f, i, a, b, c, d) in LEAVES {
        for v in [f, i, a, b, c, d] {
            h.update(&v.to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_hides_rdrand_and_rdseed() {
        let c = baseline();
        let e = c.as_slice();
        let leaf1 = e.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ecx & (1 << 30), 0);
        let leaf7 = e.iter().find(|e| e.function == 7).unwrap();
        assert_eq!(leaf7.ebx & (1 << 18), 0);
        assert_eq!(baseline_hash(), baseline_hash());
    }
}
