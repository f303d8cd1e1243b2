//! Tests of the log codec: round trips, torn and corrupt tails, truncation and resumption.

use super::*;
use alloc::vec;
use alloc::vec::Vec;

fn args(line: &str) -> Vec<Vec<u8>> {
    line.split_whitespace()
        .map(|a| a.as_bytes().to_vec())
        .collect()
}

/// A disk image and a writer on it, with `write` doing what the guest does per batch.
struct Disk {
    image: Vec<u8>,
    log: LogWriter,
    store: Store,
}

impl Disk {
    fn new(size: usize) -> Self {
        let mut d = Disk {
            image: vec![0; size],
            log: LogWriter::format(size as u64, 0xfeed).unwrap(),
            store: Store::new(1),
        };
        d.commit();
        d
    }

    /// Runs `line` at `now` and logs it like the guest does.
    fn exec(&mut self, now: u64, line: &str) {
        let a = args(line);
        let mut out = Vec::new();
        let o = self.store.execute(&a, now, &mut out);
        if let Some(rec) = o.log_args(&a) {
            self.log.append(now, rec).unwrap();
        }
    }

    /// Seals and "writes" the batch; returns its (offset, length).
    fn commit(&mut self) -> Option<(usize, usize)> {
        let b = self.log.seal()?;
        assert_eq!(b.offset % SECTOR_SIZE as u64, 0);
        assert_eq!(b.bytes.len() % SECTOR_SIZE, 0);
        let off = b.offset as usize;
        self.image[off..off + b.bytes.len()].copy_from_slice(&b.bytes);
        self.log.mark_durable();
        Some((off, b.bytes.len()))
    }
}

fn recover(image: &[u8]) -> (Store, Recovery) {
    let mut s = Store::new(2);
    let r = replay(image, &mut s).unwrap();
    (s, r)
}

#[test]
fn blank_and_foreign_disks() {
    let mut s = Store::new(1);
    assert_eq!(replay(&[0; 4096], &mut s), Err(HeaderError::Blank));
    assert_eq!(replay(&[], &mut s), Err(HeaderError::Blank));
    assert_eq!(replay(&[1; 100], &mut s), Err(HeaderError::TooShort));
    assert_eq!(replay(&[1; 4096], &mut s), Err(HeaderError::BadMagic));
    let mut h = Header::new(3, 0, 1 << 20).encode();
    h.resize(HEADER_AREA, 0);
    h[25] ^= 1;
    assert_eq!(replay(&h, &mut s), Err(HeaderError::BadChecksum));
    let d = Disk::new(4096);
    let (s, r) = recover(&d.image);
    assert_eq!((r.records, r.stop, r.end), (0, Stop::Clean, 1024));
    assert_eq!(r.generation, 0);
    assert_eq!(r.log_id, 0xfeed);
    assert!(s.is_empty());
}

#[test]
fn round_trip() {
    let mut d = Disk::new(1 << 20);
    d.exec(10, "SET a 1");
    d.exec(10, "GET a");
    d.exec(11, "LPUSH l x y z");
    d.exec(12, "SADD s m1 m2 m3 m4");
    d.exec(12, "SPOP s");
    assert!(d.commit().is_some());
    assert!(d.commit().is_none(), "nothing new to write");
    d.exec(13, "HSET h f v");
    d.exec(14, "ZADD z 1 a 2 b");
    d.exec(15, "ZPOPMIN z");
    d.exec(16, "INCR n");
    d.exec(17, "SET t v EX 100");
    d.exec(18, "EXPIRE a 1000");
    d.commit();
    let (s, r) = recover(&d.image);
    assert_eq!(r.stop, Stop::Clean);
    assert_eq!(r.records, 10);
    assert_eq!(r.end, d.log.end());
    // The data must match (not the random state or statistics).
    assert_eq!(
        s.entries().collect::<Vec<_>>(),
        d.store.entries().collect::<Vec<_>>()
    );
}

#[test]
fn expiry_replays_at_logged_time() {
    // A key that was alive when INCR ran must replay as alive, even though the replay
    // happens long after its deadline.
    let mut d = Disk::new(1 << 16);
    d.exec(1_000, "SET k 5 PX 100");
    d.exec(1_050, "INCR k");
    d.exec(1_200, "INCR k");
    d.commit();
    let (s, _) = recover(&d.image);
    assert_eq!(
        s.entries().collect::<Vec<_>>(),
        d.store.entries().collect::<Vec<_>>()
    );
    let e = s.get(b"k").unwrap();
    assert_eq!(e.expires_at, None);
    assert_eq!(e.value, crate::store::Value::Str(b"1".to_vec()));
}

#[test]
fn many_batches_across_sectors() {
    let mut d = Disk::new(1 << 20);
    let mut n = 0;
    for i in 0..300u64 {
        let v = "v".repeat((i as usize * 37) % 700);
        for j in 0..(i % 4) {
            d.exec(i, &alloc::format!("SET key{i}:{j} {v}x"));
            n += 1;
        }
        d.commit();
    }
    let (s, r) = recover(&d.image);
    assert_eq!((r.records, r.stop), (n, Stop::Clean));
    assert_eq!(s.len(), d.store.len());
    // Chunked feeding gives the same result as the whole image, for odd chunk sizes.
    for chunk in [1usize, 7, 511, 512, 4096] {
        let mut s2 = Store::new(0);
        let mut rp = Replayer::new();
        loop {
            let at = rp.next_offset() as usize;
            let c = &d.image[at..(at + chunk).min(d.image.len())];
            if rp.feed(c, &mut s2) || c.is_empty() {
                break;
            }
        }
        let r2 = rp.finish().unwrap();
        assert_eq!(r2, r);
        assert_eq!(
            s2.entries().collect::<Vec<_>>(),
            s.entries().collect::<Vec<_>>()
        );
    }
}

fn last_record_start(d: &Disk) -> usize {
    // Walk the records to find where the last one starts.
    let mut pos = HEADER_AREA;
    let mut last = pos;
    while le32(&d.image[pos..]) == RECORD_MAGIC {
        last = pos;
        pos += RECORD_HEADER_LEN + le32(&d.image[pos + 4..]) as usize;
    }
    last
}

fn three_records() -> Disk {
    let mut d = Disk::new(1 << 16);
    d.exec(1, "SET a 1");
    d.exec(2, "SET b 2");
    d.commit();
    d.exec(3, "SET c 3");
    d.commit();
    d
}

#[test]
fn torn_final_record_is_detected() {
    let d = three_records();
    let last = last_record_start(&d);
    let end = d.log.end() as usize;
    for cut in last + 1..end {
        let (s, r) = recover(&d.image[..cut]);
        assert_eq!(r.stop, Stop::Truncated, "cut at {cut}");
        assert_eq!((r.records, r.end), (2, last as u64));
        assert_eq!(s.len(), 2);
        assert!(s.get(b"c").is_none());
    }
    // Cut exactly at a record boundary: the disk simply ends there.
    let (_, r) = recover(&d.image[..last]);
    assert_eq!((r.records, r.stop), (2, Stop::EndOfImage));
    // A torn write that left zeros in place of the record's end.
    let mut img = d.image.clone();
    img[end - 3..end].fill(0);
    let (_, r) = recover(&img);
    assert_eq!((r.records, r.stop), (2, Stop::BadChecksum));
}

#[test]
fn flipped_byte_in_last_record_is_detected() {
    let d = three_records();
    let last = last_record_start(&d);
    let end = d.log.end() as usize;
    for i in last..end {
        let mut img = d.image.clone();
        img[i] ^= 0x40;
        let (s, r) = recover(&img);
        assert_eq!(r.records, 2, "flip at {i}");
        assert_eq!(r.end, last as u64);
        assert!(!r.stop.is_clean(), "flip at {i}: {:?}", r.stop);
        assert_eq!(s.len(), 2);
    }
}

#[test]
fn garbage_after_the_tail_is_ignored() {
    let mut d = three_records();
    let end = d.log.end() as usize;
    let pad_end = end.next_multiple_of(SECTOR_SIZE);
    let mut x: u32 = 1;
    for b in &mut d.image[pad_end + 512..] {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    // Even a well-formed but stale record after the end is not replayed.
    let stale = d.image[last_record_start(&d)..end].to_vec();
    d.image[pad_end..pad_end + stale.len()].copy_from_slice(&stale);
    let (s, r) = recover(&d.image);
    assert_eq!((r.records, r.stop), (3, Stop::Clean));
    assert_eq!(s.len(), 3);
}

#[test]
fn resume_after_corruption_truncates_and_continues() {
    let mut d = three_records();
    // Several more records in one batch, then corrupt the middle one of them.
    d.exec(4, "SET d 4");
    d.exec(5, "SET e 5");
    d.exec(6, "SET f 6");
    d.commit();
    let last = last_record_start(&d);
    // The record for "e" starts just before "f"'s; corrupt "e".
    let e_start = {
        let mut pos = HEADER_AREA;
        let mut starts = vec![];
        while le32(&d.image[pos..]) == RECORD_MAGIC {
            starts.push(pos);
            pos += RECORD_HEADER_LEN + le32(&d.image[pos + 4..]) as usize;
        }
        starts[starts.len() - 2]
    };
    assert!(e_start < last);
    d.image[e_start + RECORD_HEADER_LEN + 5] ^= 1;
    let (s, r) = recover(&d.image);
    assert_eq!((r.records, r.stop), (4, Stop::BadChecksum));
    assert_eq!(s.len(), 4);
    // Resume: the first batch overwrites the damaged tail even without new records.
    let mut log = LogWriter::resume(&r, d.image.len() as u64);
    assert!(log.has_unsealed());
    let b = log.seal().unwrap();
    assert_eq!(b.offset, r.end - r.end % 512);
    d.image[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
    log.mark_durable();
    let (_, r2) = recover(&d.image);
    assert_eq!((r2.records, r2.stop, r2.end), (4, Stop::Clean, r.end));
    // New writes continue the chain; the old "f" record further on is never revived.
    let mut s = s;
    let mut out = Vec::new();
    s.execute(&args("SET g 7"), 7, &mut out);
    log.append(7, &args("SET g 7")).unwrap();
    let b = log.seal().unwrap();
    d.image[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
    log.mark_durable();
    let (s3, r3) = recover(&d.image);
    assert_eq!((r3.records, r3.stop), (5, Stop::Clean));
    assert!(s3.get(b"g").is_some() && s3.get(b"e").is_none() && s3.get(b"f").is_none());
    assert_eq!(log.durable(), 1);
}

#[test]
fn disk_full() {
    // Two regions of 1024 bytes each.
    let mut log = LogWriter::format(3072, 1).unwrap();
    let big = vec![b"SET".to_vec(), b"k".to_vec(), vec![b'x'; 1000]];
    assert_eq!(log.append(0, &big), Err(LogError::Full));
    let small = args("SET k v");
    while log.append(0, &small).is_ok() {}
    assert!(log.room() < LogWriter::record_len(&small) as u64);
    let b = log.seal().unwrap();
    assert_eq!(
        b.offset + b.bytes.len() as u64,
        2048,
        "region 0 ends at 2048"
    );
    assert!(LogWriter::format(MIN_CAPACITY - 1, 1).is_err());
}

#[test]
fn one_batch_in_flight() {
    let mut log = LogWriter::format(1 << 16, 1).unwrap();
    let b0 = log.seal().unwrap();
    assert_eq!((b0.offset, b0.bytes.len(), b0.upto), (0, 1536, 0));
    log.append(5, &args("SET a b")).unwrap();
    assert!(log.seal().is_none(), "header batch still in flight");
    log.mark_durable();
    let b1 = log.seal().unwrap();
    assert_eq!((b1.offset, b1.upto), (1024, 1));
    assert_eq!(log.durable(), 0);
    log.mark_durable();
    assert_eq!(log.durable(), 1);
}

#[test]
fn fuzz_replay_never_panics() {
    let mut d = three_records();
    let mut x: u64 = 5;
    let base = d.image.clone();
    for _ in 0..3000 {
        d.image.copy_from_slice(&base);
        for _ in 0..(x % 5 + 1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % 2048;
            d.image[i] = (x >> 32) as u8;
        }
        let mut s = Store::new(0);
        let cut = (x >> 40) as usize % d.image.len();
        if let Ok(r) = replay(&d.image[..cut.max(600)], &mut s) {
            assert!(r.records <= 3);
        }
    }
}

/// Drives a small disk through many compactions the way the guest loop does, with every
/// data type and expiries in the store, and checks each recovery against the live store.
#[test]
fn compaction_keeps_everything() {
    let size = 16 * 1024;
    let mut d = Disk::new(size);
    let mut generations = 0;
    for i in 0..3000u64 {
        let k = i % 7;
        let line = match i % 6 {
            0 => alloc::format!("SET s{k} value{i}"),
            1 => alloc::format!("RPUSH l{k} e{i}"),
            2 => alloc::format!("SADD z{k} m{}", i % 5),
            3 => alloc::format!("HSET h{k} f{} v{i}", i % 3),
            4 => alloc::format!("ZADD q{k} {}.25 m{}", i % 11, i % 4),
            _ => alloc::format!("EXPIRE s{k} {}", 1000 + i),
        };
        d.exec(i, &line);
        if i % 5 == 0 {
            d.exec(i, &alloc::format!("LPOP l{k}"));
        }
        d.commit();
        if d.log.should_compact() {
            d.log.compact(&d.store, i).unwrap();
            generations += 1;
            // The snapshot batch, then the header batch.
            d.commit().unwrap();
            assert_eq!(
                d.log.durable(),
                d.log.appended(),
                "no new records in between"
            );
            let (off, len) = d.commit().unwrap();
            assert!(off < HEADER_AREA && len == SECTOR_SIZE);
        }
        if i % 97 == 0 {
            let (s, r) = recover(&d.image);
            assert!(r.stop.is_clean(), "{r}");
            assert_eq!(
                s.entries().collect::<Vec<_>>(),
                d.store.entries().collect::<Vec<_>>(),
                "at {i}"
            );
        }
    }
    assert!(generations > 10, "{generations}");
    let (_, r) = recover(&d.image);
    assert_eq!(r.generation, generations);
}

/// A store bigger than half the region: a compaction leaves the new region over half full,
/// and the next waits until the log has grown (an eighth of the region) instead of running
/// again at once, at every quiet moment.
#[test]
fn a_compaction_that_leaves_the_region_half_full_is_not_repeated_at_once() {
    let mut d = Disk::new(16 * 1024);
    let mut i = 0u64;
    // Live data over half a region, overwritten until the log asks for a compaction.
    while !d.log.should_compact() {
        d.exec(i, &alloc::format!("SET k{} {}", i % 5, "v".repeat(900)));
        d.commit();
        i += 1;
    }
    d.log.compact(&d.store, i).unwrap();
    d.commit().unwrap();
    d.commit().unwrap();
    let region = d.log.header.len;
    assert!(
        d.log.end() - d.log.header.start > region / 2,
        "the test needs a snapshot over half the region"
    );
    assert!(!d.log.should_compact(), "compacted again at once");
    let after = d.log.end();
    while d.log.end() < after + region / 8 {
        assert!(!d.log.should_compact());
        d.exec(i, "SET small 1");
        d.commit();
        i += 1;
    }
    assert!(
        d.log.should_compact(),
        "grown an eighth past it: compact again"
    );
}

/// A crash after the snapshot is written but before the header switch leaves the old
/// generation in force; a torn header write likewise.
#[test]
fn crash_during_compaction_keeps_the_old_generation() {
    let mut d = Disk::new(64 * 1024);
    for i in 0..50u64 {
        d.exec(i, &alloc::format!("SET k{i} v{i}"));
    }
    d.commit();
    let before = d.image.clone();
    d.log.compact(&d.store, 100).unwrap();
    // Writes arriving during the compaction follow the snapshot.
    d.exec(101, "SET late 1");
    d.commit().unwrap();
    assert_eq!(d.log.durable(), 50, "not durable before the header switch");
    let after_snapshot = d.image.clone();
    let b = d.log.seal().unwrap();
    assert_eq!(b.bytes.len(), SECTOR_SIZE);
    // Crash before the header write.
    let (s, r) = recover(&after_snapshot);
    assert_eq!((r.generation, r.records, s.len()), (0, 50, 50));
    // Torn header write.
    let mut torn = after_snapshot.clone();
    torn[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
    torn[b.offset as usize + 20] ^= 0xff;
    let (s, r) = recover(&torn);
    assert_eq!((r.generation, s.len()), (0, 50));
    // The header lands: the new generation holds the snapshot and the late write.
    d.image[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
    d.log.mark_durable();
    assert_eq!(d.log.durable(), 51);
    let (s, r) = recover(&d.image);
    assert_eq!((r.generation, s.len()), (1, 51));
    assert!(r.stop.is_clean());
    assert_ne!(before, d.image);
    // And appending continues in the new region.
    d.exec(102, "SET after 1");
    d.commit();
    let (s, _) = recover(&d.image);
    assert_eq!(s.len(), 52);
}

#[test]
fn compaction_refused_when_busy_or_too_big() {
    let mut d = Disk::new(8 * 1024);
    d.exec(1, "SET a 1");
    assert_eq!(d.log.compact(&d.store, 1), Err(LogError::Busy));
    d.commit();
    let big = "x".repeat(3200);
    d.exec(2, &alloc::format!("SET b {big}"));
    d.commit();
    // The store's snapshot would not leave room in a 3.5 KiB region.
    assert_eq!(d.log.compact(&d.store, 3), Err(LogError::Full));
    assert!(!d.log.should_compact(), "no retry until the log grows");
    let (s, r) = recover(&d.image);
    assert_eq!((s.len(), r.generation), (2, 0));
}

/// A store far bigger than the log's region: the compaction stops building its snapshot once
/// it cannot fit, instead of holding the whole store's records in memory (in the guest, an
/// allocation that fails ends it), and the log carries on.
#[test]
fn a_store_too_big_for_the_region_stops_the_snapshot_early() {
    let mut d = Disk::new(8 * 1024);
    d.exec(1, "SET a 1");
    d.commit();
    // Values in memory only (never logged): 200 of 1 KiB against a 3.5 KiB region.
    for i in 0..200 {
        let a = args(&alloc::format!("SET big{i} {}", "x".repeat(1000)));
        let mut out = Vec::new();
        d.store.execute(&a, 2, &mut out);
    }
    assert_eq!(d.log.compact(&d.store, 3), Err(LogError::Full));
    d.exec(4, "SET c 3");
    d.commit();
    let (s, r) = recover(&d.image);
    assert_eq!((s.get(b"c").is_some(), r.generation), (true, 0));
    // What the compaction built before it gave up: no more than the limit allows.
    let mut log = LogWriter::resume(&r, d.image.len() as u64);
    let base = log.end();
    assert!(
        !log.build_snapshot(&d.store, 5, base + 2048),
        "it cannot fit"
    );
    assert!(
        log.end() <= base + 2048,
        "the snapshot was built past its limit: {} bytes",
        log.end() - base
    );
}

/// A disk grown after formatting keeps its layout: compaction never overlaps the regions.
#[test]
fn grown_disk_keeps_its_layout() {
    let mut d = Disk::new(16 * 1024);
    for i in 0..40u64 {
        d.exec(i, &alloc::format!("SET k{} {}", i % 3, "v".repeat(100)));
        d.commit();
        if d.log.should_compact() {
            d.log.compact(&d.store, i).unwrap();
            d.commit();
            d.commit();
        }
    }
    let (_, r) = recover(&d.image);
    d.image.resize(64 * 1024, 0);
    let mut log = LogWriter::resume(&r, d.image.len() as u64);
    let mut store = d.store.clone();
    for i in 40..400u64 {
        let a = args(&alloc::format!("SET k{} {}", i % 3, "w".repeat(100)));
        let mut out = Vec::new();
        store.execute(&a, i, &mut out);
        log.append(i, &a).unwrap();
        for _ in 0..3 {
            if let Some(b) = log.seal() {
                assert!(b.offset + b.bytes.len() as u64 <= 1024 + 2 * 7680);
                d.image[b.offset as usize..][..b.bytes.len()].copy_from_slice(&b.bytes);
                log.mark_durable();
            }
            if log.should_compact() && !log.has_unsealed() {
                log.compact(&store, i).unwrap();
            }
        }
        let (s, r) = recover(&d.image);
        assert!(r.stop.is_clean());
        assert_eq!(
            s.entries().collect::<Vec<_>>(),
            store.entries().collect::<Vec<_>>()
        );
    }
}
