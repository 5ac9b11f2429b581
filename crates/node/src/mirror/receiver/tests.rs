use super::*;
use blockmirror_nbd::Errno;
use blockmirror_storage::Op;
use blockmirror_storage::StorageError;

#[test]
fn receive_errors_name_volume_peer_offset_and_carry_named_errnos() {
    let e = ReceiveError::OutOfRange {
        volume: "db".into(),
        peer: "site-a".into(),
        offset: 4096,
        len: 512,
        size: 4096,
    };
    assert_eq!(
        e.to_string(),
        "volume db, primary site-a: range 4096+512 past the end (4096)"
    );
    assert_eq!(
        e.nack(7),
        Frame::Nack {
            id: 7,
            errno: Errno::Inval.code(),
            message: e.to_string(),
        }
    );
    let full = std::io::Error::from_raw_os_error(28);
    let e = ReceiveError::Storage {
        peer: "site-a".into(),
        source: StorageError::new("db", Op::Write, 8192, 4096, full),
    };
    assert_eq!(e.errno(), Errno::NoSpc);
    assert!(
        e.to_string()
            .starts_with("primary site-a: volume db: write at offset 8192"),
        "{e}"
    );
    let e = ReceiveError::Storage {
        peer: "site-a".into(),
        source: StorageError::new("db", Op::Read, 0, 4096, std::io::Error::other("bad")),
    };
    assert_eq!(e.errno(), Errno::Io);
    let e = ReceiveError::Generations {
        volume: "db".into(),
        peer: "site-a".into(),
        relation: Relation::SplitBrain,
        ours: "1".into(),
        theirs: "2".into(),
    };
    assert!(e.to_string().contains("split brain: resolve with"), "{e}");
}
