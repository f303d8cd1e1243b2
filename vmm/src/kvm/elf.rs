//! Loading a guest ELF: a freestanding, statically linked x86-64 executable whose loadable
//! segments sit between [`IMAGE_MIN_ADDR`] and the stack. The image is untrusted input:
//! every field is checked before anything is copied, and each failure names what is wrong.
//!
//! Ours rather than `linux-loader`'s ELF loader (0.14), which loads vmlinux kernels and would
//! load these images but not check them: it does not check the class (64-bit), type
//! (ET_EXEC), machine (x86-64), number of program headers, `p_filesz <= p_memsz`, that
//! segments lie at or above [`IMAGE_MIN_ADDR`] (below it are the page tables, GDT and boot
//! information) and below the stack, that they do not overlap, or that the entry point is
//! inside one; its errors are bare variants that name no segment or address; and it skips
//! segments with no file bytes, so its end of image leaves out a trailing `.bss` segment (our
//! guests have one), which is where the heap would then start. Checking all that first
//! leaves it only the copy below.

use ftvm_abi::layout::{IMAGE_MIN_ADDR, PAGE_SIZE, STACK_SIZE};

use super::memory::GuestMemory;
use crate::error::VmmError;

const PT_LOAD: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const MAX_PHDRS: usize = 64;

/// One loadable segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub addr: u64,
    /// Offset of the file bytes in the image.
    pub offset: u64,
    /// Bytes copied from the file.
    pub file_size: u64,
    /// Bytes occupied in memory (the rest is zero).
    pub mem_size: u64,
}

/// A parsed, validated guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    /// One past the highest byte any segment occupies, rounded up to a page.
    pub end: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parses and validates `image` for a guest with `mem_size` bytes of memory.
pub fn parse(image: &[u8], mem_size: u64) -> Result<LoadedImage, VmmError> {
    let bad = |m: String| VmmError::BadImage(m);
    if image.len() < EHDR_SIZE {
        return Err(bad(format!(
            "{} bytes is too short for an ELF header",
            image.len()
        )));
    }
    if &image[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file (bad magic)".into()));
    }
    if image[4] != 2 {
        return Err(bad("not a 64-bit ELF".into()));
    }
    if image[5] != 1 {
        return Err(bad("not a little-endian ELF".into()));
    }
    let e_type = u16_at(image, 16);
    if e_type != 2 {
        return Err(bad(format!(
            "ELF type {e_type} is not an executable (ET_EXEC); build the guest statically"
        )));
    }
    let machine = u16_at(image, 18);
    if machine != 62 {
        return Err(bad(format!("ELF machine {machine} is not x86-64")));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54) as usize;
    let phnum = u16_at(image, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(bad(format!(
            "program header size {phentsize}, expected {PHDR_SIZE}"
        )));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad(format!(
            "{phnum} program headers (1..={MAX_PHDRS} allowed)"
        )));
    }
    if phoff
        .checked_add((phnum * PHDR_SIZE) as u64)
        .is_none_or(|end| end > image.len() as u64)
    {
        return Err(bad("program header table lies outside the file".into()));
    }
    let limit = mem_size.saturating_sub(STACK_SIZE);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let h = &image[phoff as usize + i * PHDR_SIZE..][..PHDR_SIZE];
        if u32_at(h, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(h, 8),
            addr: u64_at(h, 24),
            file_size: u64_at(h, 32),
            mem_size: u64_at(h, 40),
        };
        if seg.file_size > seg.mem_size {
            return Err(bad(format!(
                "segment {i}: file size {:#x} exceeds memory size {:#x}",
                seg.file_size, seg.mem_size
            )));
        }
        if seg
            .offset
            .checked_add(seg.file_size)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(bad(format!("segment {i}: file bytes lie outside the file")));
        }
        let end = seg
            .addr
            .checked_add(seg.mem_size)
            .ok_or_else(|| bad(format!("segment {i}: address range overflows")))?;
        if seg.addr < IMAGE_MIN_ADDR {
            return Err(bad(format!(
                "segment {i} at {:#x} is below the lowest load address {IMAGE_MIN_ADDR:#x}",
                seg.addr
            )));
        }
        if end > limit {
            return Err(VmmError::ImageTooLarge(format!(
                "segment {i} ends at {end:#x}, but guest memory of {mem_size:#x} bytes leaves \
                 room for the image only below {limit:#x} (the stack takes the top \
                 {STACK_SIZE:#x})"
            )));
        }
        if let Some(j) = segments
            .iter()
            .position(|s: &Segment| seg.addr < s.addr + s.mem_size && s.addr < end)
        {
            return Err(bad(format!("segments {j} and {i} overlap")));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment".into()));
    }
    if !segments
        .iter()
        .any(|s| entry >= s.addr && entry < s.addr + s.mem_size)
    {
        return Err(bad(format!(
            "entry point {entry:#x} is outside every segment"
        )));
    }
    let end = segments
        .iter()
        .map(|s| s.addr + s.mem_size)
        .max()
        .unwrap_or(IMAGE_MIN_ADDR)
        .next_multiple_of(PAGE_SIZE);
    Ok(LoadedImage {
        entry,
        segments,
        end,
    })
}

/// Copies the segments of a parsed image into guest memory (the rest stays zero).
pub fn load(parsed: &LoadedImage, image: &[u8], mem: &GuestMemory) -> Result<(), VmmError> {
    for s in &parsed.segments {
        let bytes = &image[s.offset as usize..(s.offset + s.file_size) as usize];
        mem.write(s.addr, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid ELF with one segment of `size` bytes at `addr`.
    fn elf(addr: u64, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&addr.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let h = &mut b[64..120];
        h[0..4].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&0x100u64.to_le_bytes());
        h[24..32].copy_from_slice(&addr.to_le_bytes());
        h[32..40].copy_from_slice(&0x10u64.to_le_bytes());
        h[40..48].copy_from_slice(&size.to_le_bytes());
        b
    }

    #[test]
    fn accepts_a_minimal_image() {
        let p = parse(&elf(0x20_0000, 0x10), 16 << 20).unwrap();
        assert_eq!(p.entry, 0x20_0000);
        assert_eq!(p.end, 0x20_1000);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(
            matches!(parse(b"hello", 16 << 20), Err(VmmError::BadImage(m)) if m.contains("too short"))
        );
        let mut e = elf(0x20_0000, 0x10);
        e[0] = b'X';
        assert!(matches!(parse(&e, 16 << 20), Err(VmmError::BadImage(m)) if m.contains("magic")));
        let e = elf(0x20_0000, 0x10);
        assert!(
            matches!(parse(&e[..100], 16 << 20), Err(VmmError::BadImage(m)) if m.contains("program header table"))
        );
    }

    #[test]
    fn rejects_images_that_do_not_fit() {
        let e = elf(0x20_0000, 64 << 20);
        assert!(matches!(
            parse(&e, 16 << 20),
            Err(VmmError::ImageTooLarge(_))
        ));
        let e = elf(0x1000, 0x10);
        assert!(matches!(parse(&e, 16 << 20), Err(VmmError::BadImage(m)) if m.contains("below")));
        let e = elf(u64::MAX - 4, 0x10);
        assert!(parse(&e, 16 << 20).is_err());
    }

    #[test]
    fn never_panics_on_mutations() {
        let base = elf(0x20_0000, 0x10);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut e = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % 128) as usize;
                e[i] = (x >> 32) as u8;
            }
            let _ = parse(&e, 16 << 20);
        }
    }
}
