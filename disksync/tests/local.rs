//! `ftvm-resync local` and `hash`, and the library's local pieces, on random images.

mod common;

use std::ffi::OsStr;
use std::sync::atomic::AtomicBool;

use common::*;
use disksync::local::{disk_tree, local_resync, Leaves, LocalOptions};
use disksync::lock::DiskLock;
use disksync::{Geometry, Stats};

#[test]
fn local_resync_random_divergence_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(u64, u32, Divergence)> = vec![
        (1 << 20, 4096, Divergence::None),
        ((1 << 20) + 1, 4096, Divergence::SingleBytes(13)),
        (3 << 20, 65536, Divergence::WholeBlocks(7)),
        ((2 << 20) + 4095, 4096, Divergence::FirstAndLast),
        (1 << 20, 8192, Divergence::EveryBlock),
        (1 << 20, 4096, Divergence::ZeroedBlocks(10)),
        (5, 4096, Divergence::SingleBytes(1)),
    ];
    for (k, (size, bs, div)) in cases.into_iter().enumerate() {
        let mut rng = Rng::new(k as u64);
        let (src, dst) = (dir.path().join("s"), dir.path().join("d"));
        random_image(&src, size, &mut rng);
        std::fs::copy(&src, &dst).unwrap();
        diverge(&dst, bs as u64, div, &mut rng);
        let expect = differing_blocks(&src, &dst, bs as usize);
        let s = DiskLock::shared(&src).unwrap();
        let d = DiskLock::exclusive(&dst).unwrap();
        let opts = LocalOptions {
            block_size: bs,
            ..Default::default()
        };
        let sum = local_resync(&s, &d, &opts, &Stats::new()).unwrap();
        assert_eq!(sum.blocks_sent, expect.len() as u64, "case {k}");
        assert_identical(&src, &dst);
    }
}

#[test]
fn local_and_hash_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(11);
    let (src, dst) = (dir.path().join("s.img"), dir.path().join("d.img"));
    random_image(&src, (2 << 20) + 17, &mut rng);
    std::fs::copy(&src, &dst).unwrap();
    diverge(&dst, 65536, Divergence::WholeBlocks(4), &mut rng);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dst)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    let out = run(&[OsStr::new("local"), src.as_os_str(), dst.as_os_str()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("size mismatch"),
        "{}",
        describe(&out)
    );
    let out = run(&[
        OsStr::new("local"),
        src.as_os_str(),
        dst.as_os_str(),
        "--resize".as_ref(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_identical(&src, &dst);
    let s = summary(&out);
    assert_eq!(num(&s, "compared"), 33);

    // A missing target is created.
    let new = dir.path().join("new.img");
    let out = run(&[OsStr::new("local"), src.as_os_str(), new.as_os_str()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_identical(&src, &new);

    let h1 = run(&[OsStr::new("hash"), src.as_os_str()]);
    let h2 = run(&[OsStr::new("hash"), dst.as_os_str()]);
    assert!(h1.status.success());
    let o1 = String::from_utf8_lossy(&h1.stdout).to_string();
    assert_eq!(o1, String::from_utf8_lossy(&h2.stdout));
    assert!(o1.contains("blocks 33 of 65536 bytes"), "{o1}");
    // The printed root is the library's.
    let f = std::fs::File::open(&src).unwrap();
    let geo = Geometry::new((2 << 20) + 17, 65536).unwrap();
    let t = disk_tree(
        &f,
        &src,
        geo,
        Leaves::Full,
        &Stats::new(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(o1.contains(&disksync::hash::hex(&t.root(geo))));
    // One changed byte changes the root.
    diverge(&dst, 65536, Divergence::SingleBytes(1), &mut rng);
    let h3 = run(&[OsStr::new("hash"), dst.as_os_str()]);
    assert_ne!(o1, String::from_utf8_lossy(&h3.stdout));
}

/// The fast-path tree (cache + rehash of recorded blocks) equals the fully hashed tree when
/// the record is complete, and the walk finds the same blocks.
#[test]
fn fast_tree_equals_full_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(21);
    let p = dir.path().join("d.img");
    let size = (4 << 20) + 999;
    random_image(&p, size, &mut rng);
    let geo = Geometry::new(size, 4096).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let no = AtomicBool::new(false);
    let base = disk_tree(&f, &p, geo, Leaves::Full, &Stats::new(), &no).unwrap();
    let cache = disksync::cache::LeafCache {
        generation: 1,
        geometry: geo,
        leaves: base.leaves().to_vec(),
    };
    let rec = disksync::record::WrittenBlocks::create(dir.path().join("r"), 1, geo).unwrap();
    use std::os::unix::fs::FileExt;
    for _ in 0..50 {
        let off = rng.below(size);
        let len = 1 + rng.below(20000).min(size - off - 1);
        rec.mark(off, len);
        f.write_all_at(&rng.bytes(len as usize), off).unwrap();
    }
    let stats = Stats::new();
    let cand = rec.blocks();
    let fast = disk_tree(
        &f,
        &p,
        geo,
        Leaves::Fast {
            cache: &cache,
            candidates: &cand,
        },
        &stats,
        &no,
    )
    .unwrap();
    let full = disk_tree(&f, &p, geo, Leaves::Full, &Stats::new(), &no).unwrap();
    assert_eq!(fast, full);
    assert!(Stats::get(&stats.bytes_hashed) <= cand.len() as u64 * 4096);
    assert_eq!(base.diff(&fast), base.diff(&full));
}
