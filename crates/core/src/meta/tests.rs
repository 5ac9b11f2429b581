use super::*;
use proptest::prelude::*;

fn label() -> impl Strategy<Value = MirrorLabel> {
    (0u8..4).prop_map(|c| MirrorLabel::from_code(c).unwrap())
}

fn meta() -> impl Strategy<Value = VolumeMeta> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<[u64; HISTORY_LEN]>(),
        label(),
        any::<u64>(),
        any::<bool>(),
        any::<(u64, u64)>(),
    )
        .prop_map(
            |(volume_id, current, history, label, size, clean, (promoted_from, primary_at))| {
                VolumeMeta {
                    volume_id,
                    generations: Generations { current, history },
                    label,
                    size,
                    clean,
                    promoted_from,
                    primary_at,
                }
            },
        )
}

fn verify_record() -> impl Strategy<Value = VerifyRecord> {
    (
        "[a-z0-9.:-]{1,40}",
        any::<u64>(),
        (1u8..4).prop_map(|c| VerifyOutcome::from_code(c).unwrap()),
        any::<(bool, bool, bool)>(),
        any::<[u64; 9]>(),
        proptest::collection::vec(any::<(u64, u64)>(), 0..8),
        "\\PC{0,40}",
    )
        .prop_map(
            |(peer, id, outcome, (full, mark, trunc), n, differing, error)| VerifyRecord {
                peer,
                id,
                outcome,
                full,
                mark,
                started_unix: n[0],
                finished_unix: n[1],
                total_bytes: n[2],
                done_bytes: n[3],
                skipped_bytes: n[4],
                regions_waited: n[5],
                not_ready: n[6],
                differing_bytes: n[7],
                marked_bytes: n[8],
                differing,
                differing_truncated: trunc,
                error,
            },
        )
}

fn record() -> impl Strategy<Value = MetaRecord> {
    (
        meta(),
        proptest::collection::vec(verify_record(), 0..=MAX_VERIFY_PEERS),
    )
        .prop_map(|(meta, verify)| MetaRecord { meta, verify })
}

/// Re-seals a version 4 record's header and section checksums.
fn reseal_v4(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..META_LEN].copy_from_slice(&crc.to_le_bytes());
    if b.len() > META_LEN + 4 {
        let end = b.len() - 4;
        let crc = crc32c::crc32c(&b[META_LEN..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A version 1 record as the previous build wrote it.
fn v1(id: [u8; 16], generation: u64, size: u64, clean: bool) -> [u8; META_V1_LEN] {
    let mut b = [0u8; META_V1_LEN];
    b[0..8].copy_from_slice(&META_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&u32::from(clean).to_le_bytes());
    b[16..32].copy_from_slice(&id);
    b[32..40].copy_from_slice(&generation.to_le_bytes());
    b[40..48].copy_from_slice(&size.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

proptest! {
    #[test]
    fn roundtrips(m in meta()) {
        prop_assert_eq!(VolumeMeta::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn records_with_verify_results_roundtrip(r in record()) {
        let b = r.encode();
        prop_assert_eq!(b.len() == META_LEN, r.verify.is_empty());
        prop_assert_eq!(MetaRecord::decode(&b), Ok(r.clone()));
        prop_assert_eq!(VolumeMeta::decode(&b), Ok(r.meta));
    }

    /// Any single corrupted byte of a record with verify results
    /// (header, section or either checksum) is detected.
    #[test]
    fn verify_section_corruption_is_detected(r in record(), at in any::<proptest::sample::Index>(), x in 1u8..=255) {
        let mut b = r.encode();
        let at = at.index(b.len());
        b[at] ^= x;
        prop_assert!(MetaRecord::decode(&b).is_err());
    }

    /// A record cut short or with bytes appended is refused.
    #[test]
    fn wrong_lengths_are_refused(r in record(), cut in 1usize..64, extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let b = r.encode();
        let short = &b[..b.len().saturating_sub(cut)];
        prop_assert!(MetaRecord::decode(short).is_err());
        let mut long = b.clone();
        long.extend_from_slice(&extra);
        prop_assert!(MetaRecord::decode(&long).is_err());
    }

    /// Arbitrary bytes as the verify section behind valid checksums:
    /// refused or decoded, never a panic; what decodes re-encodes to the
    /// same bytes (the format has one spelling per record).
    #[test]
    fn arbitrary_verify_sections_with_valid_crcs(m in meta(), section in proptest::collection::vec(any::<u8>(), 1..400), count in 0u8..4) {
        let mut section = section;
        section[0] = count;
        let mut b = m.header(section.len() as u32).to_vec();
        b.extend_from_slice(&section);
        b.extend_from_slice(&[0; 4]);
        reseal_v4(&mut b);
        if let Ok(r) = MetaRecord::decode(&b) {
            prop_assert_eq!(r.encode(), b);
        }
    }

    /// A valid record's section with one byte changed and both
    /// checksums resealed: judged field by field, never a panic; what
    /// decodes re-encodes to the same bytes.
    #[test]
    fn resealed_section_mutations_never_panic(r in record(), at in any::<proptest::sample::Index>(), x in 1u8..=255) {
        let mut b = r.encode();
        if b.len() > META_LEN + 4 {
            let at = META_LEN + at.index(b.len() - META_LEN - 4);
            b[at] ^= x;
            reseal_v4(&mut b);
            if let Ok(d) = MetaRecord::decode(&b) {
                prop_assert_eq!(d.encode(), b);
            }
        }
    }

    /// A version 3 record (as the previous build wrote it) loads, with
    /// no verify results; bytes in what v4 uses are refused (reserved in v3).
    #[test]
    fn v3_records_load(m in meta()) {
        let mut b = m.encode();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        reseal_v4(&mut b);
        prop_assert_eq!(MetaRecord::decode(&b), Ok(MetaRecord::from(m)));
        let mut bad = b;
        bad[SECTION_LEN_AT] = 1;
        reseal_v4(&mut bad);
        prop_assert_eq!(VolumeMeta::decode(&bad), Err(MetaError::Reserved));
    }

    /// Any single corrupted byte is detected, never decoded as a valid record.
    #[test]
    fn corruption_is_detected(m in meta(), at in 0usize..META_LEN, x in 1u8..=255) {
        let mut b = m.encode();
        b[at] ^= x;
        prop_assert!(VolumeMeta::decode(&b).is_err());
    }

    #[test]
    fn v1_corruption_is_detected(id in any::<[u8; 16]>(), g in any::<u64>(), size in any::<u64>(), at in 0usize..META_V1_LEN, x in 1u8..=255) {
        let mut b = v1(id, g, size, true);
        b[at] ^= x;
        prop_assert!(VolumeMeta::decode(&b).is_err());
    }

    #[test]
    fn v1_records_load(id in any::<[u8; 16]>(), g in any::<u64>(), size in any::<u64>(), clean in any::<bool>()) {
        let m = VolumeMeta::decode(&v1(id, g, size, clean)).unwrap();
        prop_assert_eq!(m.volume_id, id);
        prop_assert_eq!(m.generations, Generations { current: g, history: [0; HISTORY_LEN] });
        prop_assert_eq!(m.size, size);
        prop_assert_eq!(m.clean, clean);
        prop_assert_eq!(m.label, MirrorLabel::Consistent);
    }

    /// A version 2 record (as the previous build wrote it) loads, with
    /// "primary at" derived from its label.
    #[test]
    fn v2_records_load(m in meta()) {
        let mut b = m.encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[PROMOTED_FROM_AT..PRIMARY_AT_AT + 8].fill(0);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        let d = VolumeMeta::decode(&b).unwrap();
        prop_assert_eq!(d.generations, m.generations);
        prop_assert_eq!(d.label, m.label);
        prop_assert_eq!(d.promoted_from, 0);
        let expect = if m.label == MirrorLabel::None { m.generations.current } else { 0 };
        prop_assert_eq!(d.primary_at, expect);
        // A v2 record with bytes in what v3 uses is refused (they were reserved).
        let mut bad = b;
        bad[PROMOTED_FROM_AT] = 1;
        let crc = crc32c::crc32c(&bad[..CRC_AT]);
        bad[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        prop_assert_eq!(VolumeMeta::decode(&bad), Err(MetaError::Reserved));
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..160)) {
        let _ = VolumeMeta::decode(&b);
    }

    /// Arbitrary bytes behind a valid magic, version and checksum: still
    /// judged field by field, never a panic.
    #[test]
    fn arbitrary_fields_with_valid_crc(b in proptest::array::uniform32(any::<u8>()), tail in proptest::collection::vec(any::<u8>(), 96)) {
        let mut rec = [0u8; META_LEN];
        rec[..32].copy_from_slice(&b);
        rec[32..].copy_from_slice(&tail);
        rec[0..8].copy_from_slice(&META_MAGIC);
        rec[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let crc = crc32c::crc32c(&rec[..CRC_AT]);
        rec[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(m) = VolumeMeta::decode(&rec) {
            prop_assert_eq!(m.encode(), rec);
        }
    }
}

#[test]
fn errors_are_specific() {
    let m = VolumeMeta::new([7; 16], 4096, 0x1234);
    assert_eq!(VolumeMeta::decode(&[0; 10]), Err(MetaError::Length(10)));
    let mut b = m.encode();
    b[0] = b'X';
    assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Magic));
    let mut b = m.encode();
    b[8] = 9;
    assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Version(9)));
    // A v2, v3 or v4 header on a v1-sized record.
    for v in [2, 3, 4] {
        let mut b = v1([1; 16], 1, 4096, false);
        b[8] = v;
        assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Length(64)));
    }
    let reseal = |mut b: [u8; META_LEN]| {
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut b = m.encode();
    b[LABEL_AT] = 9;
    assert_eq!(VolumeMeta::decode(&reseal(b)), Err(MetaError::Label(9)));
    for at in [84, 110] {
        let mut b = m.encode();
        b[at] = 1;
        assert_eq!(VolumeMeta::decode(&reseal(b)), Err(MetaError::Reserved));
    }
    assert_eq!(m.primary_at, 0x1234);
    assert_eq!(
        m.generation_string(),
        format!("{}:0000000000001234", "07".repeat(16))
    );
    // A v4 header announcing no section, with bytes after it; one
    // announcing a section past the limit.
    let mut b = m.encode().to_vec();
    b.extend_from_slice(&[0; 8]);
    assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Length(136)));
    let mut b = m.header((MAX_VERIFY_SECTION + 1) as u32).to_vec();
    b.resize(META_LEN + MAX_VERIFY_SECTION + 5, 0);
    assert_eq!(
        VolumeMeta::decode(&b),
        Err(MetaError::Verify("section too large"))
    );
    let mirror = VolumeMeta::new_mirror([1; 16], 4096);
    assert!(mirror.generations.is_blank());
    assert_eq!(mirror.label, MirrorLabel::Inconsistent);
}

fn sample(peer: &str, finished: u64) -> VerifyRecord {
    VerifyRecord {
        peer: peer.into(),
        id: 3,
        outcome: VerifyOutcome::Differ,
        full: false,
        mark: true,
        started_unix: finished - 1,
        finished_unix: finished,
        total_bytes: 1 << 20,
        done_bytes: 1 << 20,
        skipped_bytes: 0,
        regions_waited: 0,
        not_ready: 0,
        differing_bytes: 4096,
        marked_bytes: 4096,
        differing: vec![(0, 4096)],
        differing_truncated: false,
        error: String::new(),
    }
}

#[test]
fn verify_records_are_bounded_and_replaced_per_peer() {
    let mut big = sample("m", 10);
    big.differing = (0..300).map(|i| (i * 8192, 4096)).collect();
    big.error = "é".repeat(MAX_VERIFY_ERROR_LEN); // 2 bytes each
    let b = big.bounded();
    assert_eq!(b.differing.len(), MAX_VERIFY_RANGES);
    assert!(b.differing_truncated);
    assert_eq!(b.error.len(), MAX_VERIFY_ERROR_LEN);
    let mut r = MetaRecord::from(VolumeMeta::new([1; 16], 1 << 20, 5));
    r.set_verify(big);
    assert_eq!(MetaRecord::decode(&r.encode()).unwrap(), r);
    r.set_verify(sample("m", 11));
    assert_eq!(r.verify.len(), 1);
    assert_eq!(r.verify_of("m").unwrap().finished_unix, 11);
    for i in 0..MAX_VERIFY_PEERS as u64 {
        r.set_verify(sample(&format!("p{i}"), 100 + i));
    }
    assert_eq!(r.verify.len(), MAX_VERIFY_PEERS);
    assert!(r.verify_of("m").is_none(), "the oldest result went");
    assert_eq!(MetaRecord::decode(&r.encode()).unwrap(), r);
    assert_eq!(
        VerifyOutcome::from_name("differ"),
        Some(VerifyOutcome::Differ)
    );
    assert_eq!(VerifyOutcome::from_name("running"), None);
}
