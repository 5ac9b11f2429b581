//! Generation identifiers: which side of a mirror pair holds newer data, and
//! whether both sides changed independently (a split brain).
//!
//! The scheme is DRBD's UUID set, reduced to what blockmirror needs. Each
//! volume carries a [`Generations`] record: a `current` id (random, 64 bits)
//! naming the lineage of data it holds, and a short `history` of the ids it
//! held before, most recent first. The value 0 means "none".
//!
//! A side starts a new generation (moves `current` into the history and
//! draws a new random id) whenever it is about to write data its peer will
//! not get synchronously:
//!
//! - a primary, on the first host write after a mirror link went down (once
//!   per outage: the flag is reset when every mirror is in sync again);
//! - a mirror, when it is promoted to primary.
//!
//! A mirror that finished a resync adopts the primary's record as its own.
//! A mirror whose data was thrown away (a new mirror, or `resync
//! --discard-local`) has `current == 0`: it holds no lineage and accepts a
//! full copy from any primary.
//!
//! [`compare`] then decides, from the two records alone:
//!
//! | local vs peer | relation | what the primary does |
//! |---|---|---|
//! | same `current` | [`Relation::Same`] | copies what its out-of-sync bitmap marks |
//! | peer's `current` is in local's history | [`Relation::LocalAhead`] | copies what its bitmap marks (the bitmap has covered every write since the link was last in sync) |
//! | local's `current` is in peer's history | [`Relation::PeerAhead`] | nothing: the peer was promoted; this side must be demoted |
//! | the two histories share an id, neither contains the other's `current` | [`Relation::SplitBrain`] | nothing, until an operator discards one side |
//! | peer `current == 0` | [`Relation::PeerBlank`] | copies the whole volume |
//! | local `current == 0` | [`Relation::LocalBlank`] | (the mirror's view: accepts a full copy) |
//! | nothing in common | [`Relation::Unrelated`] | nothing: different data under one name |

/// How many earlier generation ids a record keeps.
pub const HISTORY_LEN: usize = 4;

/// A volume's generation record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Generations {
    /// The lineage of the data held now; 0 for none (blank).
    pub current: u64,
    /// Earlier `current` values, most recent first; 0 entries are unused.
    pub history: [u64; HISTORY_LEN],
}

/// How two generation records relate (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    Same,
    LocalAhead,
    PeerAhead,
    SplitBrain,
    PeerBlank,
    LocalBlank,
    Unrelated,
}

impl Relation {
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Same => "same",
            Relation::LocalAhead => "local_ahead",
            Relation::PeerAhead => "peer_ahead",
            Relation::SplitBrain => "split_brain",
            Relation::PeerBlank => "peer_blank",
            Relation::LocalBlank => "local_blank",
            Relation::Unrelated => "unrelated",
        }
    }
}

impl Generations {
    /// A record with no lineage: a new or discarded mirror.
    pub const fn blank() -> Self {
        Self {
            current: 0,
            history: [0; HISTORY_LEN],
        }
    }

    /// A new lineage with id `id` (non-zero; a zero id is replaced by 1).
    pub fn fresh(id: u64) -> Self {
        Self {
            current: id.max(1),
            history: [0; HISTORY_LEN],
        }
    }

    pub fn is_blank(&self) -> bool {
        self.current == 0
    }

    /// Starts a new generation `id`: the current one moves into the history
    /// (the oldest entry falls off). A zero id is replaced by 1; an id equal
    /// to the current one is changed so the generation really moves.
    pub fn rotate(&mut self, id: u64) {
        let mut id = id.max(1);
        if id == self.current {
            id = id.wrapping_add(1).max(1);
        }
        if self.current != 0 {
            self.history.copy_within(0..HISTORY_LEN - 1, 1);
            self.history[0] = self.current;
        }
        self.current = id;
    }

    /// Goes back to the generation before `rotate` (cluster mode: a
    /// generation this node started but never published, under which no
    /// write was acknowledged, is undone when the node steps down, so that
    /// the new primary, promoted from the published one, sees this node as
    /// behind it rather than as a split brain). Returns false, changing
    /// nothing, when there is no earlier generation.
    pub fn unrotate(&mut self) -> bool {
        if self.history[0] == 0 {
            return false;
        }
        self.current = self.history[0];
        self.history.copy_within(1..HISTORY_LEN, 0);
        self.history[HISTORY_LEN - 1] = 0;
        true
    }

    /// Drops this side's lineage (its data is about to be overwritten by a
    /// full copy). The old current id is kept in the history for the record.
    pub fn discard(&mut self) {
        let id = self.current;
        if id != 0 {
            self.history.copy_within(0..HISTORY_LEN - 1, 1);
            self.history[0] = id;
        }
        self.current = 0;
    }

    fn in_history(&self, id: u64) -> bool {
        id != 0 && self.history.contains(&id)
    }

    /// Every non-zero id this record has held.
    fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.current)
            .chain(self.history.iter().copied())
            .filter(|&x| x != 0)
    }

    /// `<current>` and the history, as hex, for logs and /status.
    pub fn to_display(&self) -> String {
        let mut s = format!("{:016x}", self.current);
        for h in self.history.iter().filter(|&&h| h != 0) {
            s.push_str(&format!(" <- {h:016x}"));
        }
        s
    }
}

/// How `local` relates to `peer` (see the module table). Symmetric: swapping
/// the arguments swaps `LocalAhead`/`PeerAhead` and `LocalBlank`/`PeerBlank`.
pub fn compare(local: &Generations, peer: &Generations) -> Relation {
    if local.current == 0 && peer.current == 0 {
        // Two blank volumes: nothing to copy either way; the primary's next
        // write starts a lineage.
        return Relation::Same;
    }
    if local.current == peer.current {
        return Relation::Same;
    }
    if peer.current == 0 {
        return Relation::PeerBlank;
    }
    if local.current == 0 {
        return Relation::LocalBlank;
    }
    let local_knows_peer = local.in_history(peer.current);
    let peer_knows_local = peer.in_history(local.current);
    match (local_knows_peer, peer_knows_local) {
        (true, false) => Relation::LocalAhead,
        (false, true) => Relation::PeerAhead,
        // Each claims to descend from the other: only a corrupted or forged
        // record can say so. Refuse automatic resync.
        (true, true) => Relation::SplitBrain,
        (false, false) => {
            if local
                .ids()
                .any(|id| peer.in_history(id) || id == peer.current)
            {
                Relation::SplitBrain
            } else {
                Relation::Unrelated
            }
        }
    }
}

impl Relation {
    /// The relation seen from the other side.
    pub fn mirrored(self) -> Relation {
        match self {
            Relation::LocalAhead => Relation::PeerAhead,
            Relation::PeerAhead => Relation::LocalAhead,
            Relation::PeerBlank => Relation::LocalBlank,
            Relation::LocalBlank => Relation::PeerBlank,
            r => r,
        }
    }

    /// Whether a primary seeing this relation may copy its data to the peer
    /// automatically.
    pub fn primary_may_sync(self) -> bool {
        matches!(
            self,
            Relation::Same | Relation::LocalAhead | Relation::PeerBlank
        )
    }

    /// Whether the primary must copy the whole volume (the peer holds no
    /// lineage, so its out-of-sync bitmap says nothing about it).
    pub fn needs_full_copy(self) -> bool {
        self == Relation::PeerBlank
    }
}

/// Where a primary that may sync a peer ([`compare`] gave `Same` or
/// `LocalAhead`) learns what to copy. A bitmap this node keeps for a peer
/// starts when this node becomes a primary by promotion (it is cleared
/// then), so it says nothing about a peer that was last in step with this
/// node before that promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncBasis {
    /// The bitmap covers every difference (the peer was in step with this
    /// primary at a generation it made).
    Bitmap,
    /// Failback: the peer is the primary this node was promoted from, still
    /// at that generation. The bitmap (this node's writes since the
    /// promotion) plus the regions the peer reports (its own writes the
    /// promotion did not see).
    BitmapAndPeer,
    /// Nothing here records how the peer differs (it was another mirror of
    /// the old primary, or fell behind before the promotion): compare every
    /// block by checksum and copy those that differ.
    CompareAll,
}

/// Decides the [`ResyncBasis`] for a peer. `promoted_from` is the generation
/// that was current when this node was last promoted (0: never);
/// `peer_was_primary` says the peer wrote its current generation as a
/// primary itself.
pub fn resync_basis(
    local: &Generations,
    promoted_from: u64,
    peer: &Generations,
    peer_was_primary: bool,
) -> ResyncBasis {
    // Position in the local record: 0 the current id, 1.. the history
    // (larger is older).
    let pos = |id: u64| -> Option<usize> {
        if id == 0 {
            return None;
        }
        std::iter::once(local.current)
            .chain(local.history.iter().copied())
            .position(|x| x == id)
    };
    let Some(promoted) = pos(promoted_from) else {
        // Never promoted, or so long ago that the record forgot it: every
        // generation it still holds was made here as a primary.
        return ResyncBasis::Bitmap;
    };
    match pos(peer.current) {
        Some(p) if p < promoted => ResyncBasis::Bitmap,
        Some(p) if p == promoted && peer_was_primary => ResyncBasis::BitmapAndPeer,
        _ => ResyncBasis::CompareAll,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(current: u64, history: &[u64]) -> Generations {
        let mut h = [0; HISTORY_LEN];
        h[..history.len()].copy_from_slice(history);
        Generations {
            current,
            history: h,
        }
    }

    #[test]
    fn rotate_and_discard_keep_history_in_order() {
        let mut a = Generations::fresh(10);
        a.rotate(11);
        a.rotate(12);
        assert_eq!(a, g(12, &[11, 10]));
        for id in 13..20 {
            a.rotate(id);
        }
        assert_eq!(a, g(19, &[18, 17, 16, 15]));
        a.rotate(19);
        assert_ne!(a.current, 19, "rotation always moves");
        let mut b = Generations::blank();
        b.rotate(0);
        assert_eq!(b, g(1, &[]), "a blank record gains a lineage, no history");
        let mut c = g(5, &[4]);
        c.discard();
        assert_eq!(c, g(0, &[5, 4]));
        assert!(c.is_blank());
    }

    #[test]
    fn the_table_of_cases() {
        let base = g(1, &[]);
        // Same lineage.
        assert_eq!(compare(&base, &base), Relation::Same);
        assert_eq!(
            compare(&Generations::blank(), &Generations::blank()),
            Relation::Same
        );
        // The primary wrote during an outage.
        let p = g(2, &[1]);
        assert_eq!(compare(&p, &base), Relation::LocalAhead);
        assert_eq!(compare(&base, &p), Relation::PeerAhead);
        // And again, several outages later.
        assert_eq!(compare(&g(4, &[3, 2, 1]), &base), Relation::LocalAhead);
        // The mirror was promoted while the primary also wrote.
        let m = g(3, &[1]);
        assert_eq!(compare(&p, &m), Relation::SplitBrain);
        assert_eq!(compare(&m, &p), Relation::SplitBrain);
        // Diverged further on both sides: still a split brain.
        assert_eq!(
            compare(&g(7, &[6, 2, 1]), &g(9, &[8, 3, 1])),
            Relation::SplitBrain
        );
        // Blank sides.
        assert_eq!(compare(&p, &Generations::blank()), Relation::PeerBlank);
        assert_eq!(compare(&g(0, &[3, 1]), &p), Relation::LocalBlank);
        // Nothing in common.
        assert_eq!(compare(&g(5, &[]), &g(6, &[])), Relation::Unrelated);
        // A forged pair that each claim to descend from the other.
        assert_eq!(compare(&g(5, &[6]), &g(6, &[5])), Relation::SplitBrain);
    }

    #[test]
    fn only_safe_relations_sync_automatically() {
        use Relation::*;
        let all = [
            Same, LocalAhead, PeerAhead, SplitBrain, PeerBlank, LocalBlank, Unrelated,
        ];
        let ok: Vec<_> = all.iter().filter(|r| r.primary_may_sync()).collect();
        assert_eq!(ok, [&Same, &LocalAhead, &PeerBlank]);
        assert!(PeerBlank.needs_full_copy() && !Same.needs_full_copy());
        for r in all {
            assert_eq!(r.mirrored().mirrored(), r);
        }
    }

    fn gens() -> impl Strategy<Value = Generations> {
        // Small ids so that shared ids (and so every relation) come up often.
        (0u64..8, proptest::array::uniform4(0u64..8))
            .prop_map(|(current, history)| Generations { current, history })
    }

    /// A pair of records produced by a random history of events from one
    /// common start: the model knows who wrote since they last agreed.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        /// The primary writes during an outage (rotates once per outage).
        PrimaryWrites,
        /// The mirror is promoted and written.
        MirrorPromoted,
        /// A resync completes: the mirror adopts the primary's record.
        Resync,
    }

    fn events() -> impl Strategy<Value = Vec<Event>> {
        proptest::collection::vec(
            prop_oneof![
                Just(Event::PrimaryWrites),
                Just(Event::MirrorPromoted),
                Just(Event::Resync),
            ],
            0..12,
        )
    }

    proptest! {
        #[test]
        fn compare_is_symmetric(a in gens(), b in gens()) {
            prop_assert_eq!(compare(&a, &b), compare(&b, &a).mirrored());
        }

        /// Against a model of the events: an automatic sync is allowed
        /// exactly when the mirror has written nothing since they last
        /// agreed, and a split brain is reported whenever both have (as long
        /// as the common id is still in the history).
        #[test]
        fn decisions_match_the_model(evs in events(), seed in any::<u64>()) {
            let mut next = seed | 1;
            let mut id = || { next = next.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); next | 1 };
            let start = Generations::fresh(id());
            let (mut p, mut m) = (start, start);
            let (mut p_wrote, mut m_wrote) = (false, false);
            let (mut p_rotations, mut m_rotations) = (0usize, 0usize);
            for e in evs {
                match e {
                    Event::PrimaryWrites => if !p_wrote { p.rotate(id()); p_wrote = true; p_rotations += 1; },
                    Event::MirrorPromoted => { m.rotate(id()); m_wrote = true; m_rotations += 1; },
                    Event::Resync => if !m_wrote { m = p; p_wrote = false; p_rotations = 0; m_rotations = 0; },
                }
            }
            let r = compare(&p, &m);
            match (p_wrote, m_wrote) {
                (false, false) => prop_assert_eq!(r, Relation::Same),
                (true, false) => prop_assert_eq!(r, Relation::LocalAhead),
                (false, true) => {
                    if m_rotations <= HISTORY_LEN { prop_assert_eq!(r, Relation::PeerAhead) }
                    prop_assert!(!r.primary_may_sync());
                }
                (true, true) => {
                    if p_rotations < HISTORY_LEN && m_rotations < HISTORY_LEN {
                        prop_assert_eq!(r, Relation::SplitBrain)
                    }
                    prop_assert!(!r.primary_may_sync(), "{:?} {:?} -> {:?}", p, m, r);
                }
            }
        }

        #[test]
        fn never_panics(a in any::<u64>(), ah in any::<[u64; HISTORY_LEN]>(), b in any::<u64>(), bh in any::<[u64; HISTORY_LEN]>()) {
            let _ = compare(&Generations { current: a, history: ah }, &Generations { current: b, history: bh });
        }
    }

    #[test]
    fn resync_basis_follows_the_promotion() {
        // Promoted from 1 to 2, then a rotation to 3 while a peer was away.
        let local = g(3, &[2, 1]);
        use ResyncBasis::*;
        // Never promoted: the bitmap always covers.
        assert_eq!(resync_basis(&local, 0, &g(1, &[]), false), Bitmap);
        // In step since the promotion.
        assert_eq!(resync_basis(&local, 1, &g(3, &[2, 1]), false), Bitmap);
        assert_eq!(resync_basis(&local, 1, &g(2, &[1]), false), Bitmap);
        // The old primary comes back: its report plus the bitmap.
        assert_eq!(resync_basis(&local, 1, &g(1, &[]), true), BitmapAndPeer);
        // Another mirror of the old primary: nothing records it.
        assert_eq!(resync_basis(&local, 1, &g(1, &[]), false), CompareAll);
        // Behind the promotion point: nothing records it either, even if it
        // once was a primary.
        assert_eq!(
            resync_basis(&g(3, &[2, 1, 9]), 1, &g(9, &[]), true),
            CompareAll
        );
        // The promotion fell off the history: what is left was made here.
        assert_eq!(
            resync_basis(&g(6, &[5, 4, 3, 2]), 1, &g(3, &[]), false),
            Bitmap
        );
    }
}
