//! Random sequences of writes, trims and zeroing applied to a backend and to
//! a plain `Vec<u8>` model must leave identical contents.

use blockmirror_storage::{Backend, FileBackend, FileOptions, MemBackend};
use proptest::prelude::*;

/// Not a multiple of 4096, to exercise the O_DIRECT tail.
const SIZE: u64 = 200_000 + 1234;

#[derive(Debug, Clone)]
enum Action {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
}

/// Offsets and lengths: arbitrary bytes or 512-byte multiples, clipped to the volume.
fn range() -> impl Strategy<Value = (u64, u64)> {
    let off = prop_oneof![0..SIZE, (0..SIZE / 512).prop_map(|x| x * 512)];
    let len = prop_oneof![0..20_000u64, (0..80u64).prop_map(|x| x * 512)];
    (off, len).prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((off, len), seed, fua)| Action::Write { off, len, seed, fua }),
        1 => range().prop_map(|(off, len)| Action::Trim { off, len }),
        1 => (range(), any::<bool>(), any::<bool>())
            .prop_map(|((off, len), may_trim, fua)| Action::Zero { off, len, may_trim, fua }),
        1 => range().prop_map(|(off, len)| Action::Read { off, len }),
    ]
}

fn check(b: &dyn Backend, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut model = vec![0u8; SIZE as usize];
    prop_assert_eq!(b.size(), SIZE);
    for a in actions {
        match *a {
            Action::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed) | 1).collect();
                b.write_at(&data, off, fua).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Action::Trim { off, len } => {
                b.trim(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Action::Zero {
                off,
                len,
                may_trim,
                fua,
            } => {
                b.write_zeroes(off, len, may_trim, fua).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Action::Read { off, len } => {
                let mut buf = vec![0xffu8; len as usize];
                b.read_at(&mut buf, off).unwrap();
                prop_assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read at {off} len {len}"
                );
            }
        }
    }
    let mut all = vec![0xffu8; SIZE as usize];
    b.read_at(&mut all, 0).unwrap();
    prop_assert!(all == model, "final contents differ");

    // Extents tile the volume, and every hole reads as zeroes.
    let extents = b.allocation(0, SIZE).unwrap();
    let mut pos = 0;
    for e in &extents {
        prop_assert!(e.len > 0);
        if e.hole {
            prop_assert!(model[pos as usize..(pos + e.len) as usize]
                .iter()
                .all(|&x| x == 0));
        }
        pos += e.len;
    }
    prop_assert_eq!(pos, SIZE);
    Ok(())
}

fn open_file(dir: &tempfile::TempDir, direct: bool) -> Option<FileBackend> {
    let mut o = FileOptions::new(dir.path().join("vol"), SIZE);
    o.direct = direct;
    match FileBackend::open("model", &o) {
        Ok(b) => Some(b),
        Err(e) if direct && e.cause.kind() == std::io::ErrorKind::InvalidInput => {
            println!("skipping: O_DIRECT unsupported here: {e}");
            None
        }
        Err(e) => panic!("open: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn file_matches_model(actions in prop::collection::vec(action(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let b = open_file(&dir, false).unwrap();
        check(&b, &actions)?;
    }

    #[test]
    fn direct_file_matches_model(actions in prop::collection::vec(action(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(b) = open_file(&dir, true) {
            check(&b, &actions)?;
        }
    }
}

proptest! {
    #[test]
    fn mem_matches_model(actions in prop::collection::vec(action(), 1..30)) {
        check(&MemBackend::new("model", SIZE), &actions)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Opt-in: `BLOCKMIRROR_TEST_BLOCKDEV=/dev/loopN` (its contents are destroyed).
    #[test]
    fn block_device_matches_model(actions in prop::collection::vec(action(), 1..30), direct in any::<bool>()) {
        let Ok(dev) = std::env::var("BLOCKMIRROR_TEST_BLOCKDEV") else { return Ok(()) };
        let mut o = FileOptions::new(dev, SIZE);
        o.create = false;
        o.direct = direct;
        let b = FileBackend::open("model", &o).unwrap();
        b.write_zeroes(0, SIZE, false, false).unwrap();
        check(&b, &actions)?;
    }
}
