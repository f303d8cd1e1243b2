//! CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), table driven ("slicing by 8": eight
//! bytes per step through eight tables), usable in `const` context so the tables cost
//! nothing at run time. No CPU feature is detected or assumed (the guest may not read
//! CPUID), so this is plain integer code.

/// `TABLES[0]` is the classic byte table; `TABLES[k][b]` is the CRC of byte `b` followed by
/// `k` zero bytes, which lets one step fold eight input bytes at once.
const TABLES: [[u32; 256]; 8] = make_tables();

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

/// Continues a CRC-32 computation: `update(update(0, a), b) == crc32(a ++ b)`.
/// `crc` is a finished CRC value (0 for the empty input), so chaining records is just
/// feeding the previous record's checksum in as the starting value.
pub fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for w in &mut chunks {
        let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        c = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xff) as usize]
            ^ TABLES[2][((hi >> 8) & 0xff) as usize]
            ^ TABLES[1][((hi >> 16) & 0xff) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = TABLES[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    update(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, a bit at a time: what the tables must agree with.
    fn bitwise(crc: u32, data: &[u8]) -> u32 {
        let mut c = !crc;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(update(crc32(b"1234"), b"56789"), 0xCBF4_3926);
    }

    #[test]
    fn agrees_with_the_bitwise_definition_at_every_length_and_alignment() {
        // A fixed input that uses every byte value (a multiplicative walk mod 256, mixed with
        // the position's high bits), so a failure reproduces.
        let data: alloc::vec::Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(167).wrapping_add(13) ^ (i >> 3)) as u8)
            .collect();
        for start in 0..9 {
            for end in start..data.len() {
                let d = &data[start..end];
                assert_eq!(update(0, d), bitwise(0, d), "[{start}..{end}]");
                assert_eq!(update(0xDEAD_BEEF, d), bitwise(0xDEAD_BEEF, d));
            }
        }
    }
}
