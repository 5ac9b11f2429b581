//! Seed 002's device and job records: the mirror's bounded table of the
//! long-running jobs (verify, remote read) that primaries open on its volumes.
//!
//! The seed keeps, per device (volume), a *device record* (active job
//! pointer, job count, constants, shared parameters) and, per job, a *job
//! record* (constants copied from the device, a pointer back to the device,
//! job data, forward and backward pointers that make a ring of the device's
//! jobs). All job records live in one bounded array; a new job takes the
//! first free slot; a full array is an error. A *link id* (the mirror's id
//! and the job's slot) names a job on the wire, and a request carrying the
//! invalid link id asks for a new job.
//!
//! Here:
//!
//! - [`JobTable`] is the bounded array (a slab). The first free slot is found
//!   in O(log n) from an ordered free set, not by a scan.
//! - [`LinkId`] is the mirror id, the slot, and the slot's *generation*: a
//!   slot's generation moves on every time it is freed, so a link id is never
//!   reused while its job lives, and a late request naming a closed job is
//!   refused ([`JobError::UnknownLink`]) instead of reaching its successor.
//!   [`LinkId::INVALID`] (all zero) is never issued: generations start at 1.
//! - [`DeviceRecord`] holds the active job, the job count, the constants
//!   (copied into each job record) and the shared parameters. The seed's
//!   "shared pointer" is the job's [`DeviceId`]: the device's record and
//!   shared parameters are reached from any job through it.
//! - The ring of a device's jobs is kept as slot indices (`next`, `prev`),
//!   so it can be walked either way from the active job, as in the seed.
//!
//! No I/O: the node's job handler runs this table (see
//! `crates/node/src/replication/jobs.rs`).

use std::collections::BTreeSet;

use thiserror::Error;

/// Names one job on the wire: the mirror's id, the job's slot, and the
/// slot's generation. Encoded in 64 bits: `mirror << 48 | slot << 32 | generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    pub mirror: u16,
    pub slot: u16,
    pub generation: u32,
}

impl LinkId {
    /// The link id a request carries to ask for a new job. Never issued.
    pub const INVALID: LinkId = LinkId {
        mirror: 0,
        slot: 0,
        generation: 0,
    };

    pub fn to_u64(self) -> u64 {
        (u64::from(self.mirror) << 48) | (u64::from(self.slot) << 32) | u64::from(self.generation)
    }

    pub fn from_u64(v: u64) -> LinkId {
        LinkId {
            mirror: (v >> 48) as u16,
            slot: (v >> 32) as u16,
            generation: v as u32,
        }
    }

    pub fn is_invalid(self) -> bool {
        self.generation == 0
    }
}

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}:{}.{}", self.mirror, self.slot, self.generation)
    }
}

/// A device record's index in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

/// Why a job could not be opened or found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JobError {
    /// Every slot holds a live job (the wire's BUSY).
    #[error("job table full ({capacity} jobs)")]
    Full { capacity: usize },
    /// No live job has this link id: closed, never opened, or another
    /// mirror's.
    #[error("no job with link id {0}")]
    UnknownLink(LinkId),
    #[error("no device {0:?}")]
    UnknownDevice(DeviceId),
    #[error("the invalid link id names no job")]
    InvalidLink,
}

/// Seed 002's device record.
#[derive(Debug, Clone)]
pub struct DeviceRecord<C, S> {
    /// The slot of the device's active job (the ring's entry point).
    active: Option<u16>,
    /// How many jobs the device has.
    count: usize,
    /// Per-device constants; each job record gets a copy.
    pub constants: C,
    /// Per-device parameters that change, shared by all its jobs.
    pub shared: S,
}

impl<C, S> DeviceRecord<C, S> {
    pub fn job_count(&self) -> usize {
        self.count
    }
}

/// Seed 002's job record.
#[derive(Debug, Clone)]
pub struct JobRecord<C, J> {
    /// The device's constants, copied when the job was opened.
    pub constants: C,
    /// The "shared pointer": the device this job belongs to.
    pub device: DeviceId,
    /// This job's own data.
    pub data: J,
    next: u16,
    prev: u16,
}

#[derive(Debug, Clone)]
struct Slot<C, J> {
    generation: u32,
    job: Option<JobRecord<C, J>>,
}

/// The bounded job array and the device records (see the module docs).
#[derive(Debug, Clone)]
pub struct JobTable<C, S, J> {
    mirror: u16,
    slots: Vec<Slot<C, J>>,
    free: BTreeSet<u16>,
    devices: Vec<DeviceRecord<C, S>>,
}

impl<C: Clone, S, J> JobTable<C, S, J> {
    /// A table of `capacity` job slots (at most 65536) for the mirror `mirror`.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0 or above 65536.
    pub fn new(mirror: u16, capacity: usize) -> Self {
        assert!(
            (1..=1 << 16).contains(&capacity),
            "job table capacity {capacity}"
        );
        Self {
            mirror,
            slots: (0..capacity)
                .map(|_| Slot {
                    generation: 1,
                    job: None,
                })
                .collect(),
            free: (0..capacity).map(|s| s as u16).collect(),
            devices: Vec::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Live jobs, all devices.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.len() == self.slots.len()
    }

    /// Adds a device record with no jobs.
    pub fn add_device(&mut self, constants: C, shared: S) -> DeviceId {
        self.devices.push(DeviceRecord {
            active: None,
            count: 0,
            constants,
            shared,
        });
        DeviceId(self.devices.len() - 1)
    }

    pub fn device(&self, d: DeviceId) -> Option<&DeviceRecord<C, S>> {
        self.devices.get(d.0)
    }

    pub fn device_mut(&mut self, d: DeviceId) -> Option<&mut DeviceRecord<C, S>> {
        self.devices.get_mut(d.0)
    }

    /// Opens a job on device `d` in the first free slot (seed 002's Fig. 15:
    /// find a free element, point it at the device, copy the constants,
    /// initialise the job data, link it into the device's ring, count it).
    pub fn open(&mut self, d: DeviceId, data: J) -> Result<LinkId, JobError> {
        let dev = self.devices.get(d.0).ok_or(JobError::UnknownDevice(d))?;
        let Some(&slot) = self.free.first() else {
            return Err(JobError::Full {
                capacity: self.slots.len(),
            });
        };
        let constants = dev.constants.clone();
        let (next, prev) = match dev.active {
            // Inserted just before the active job: at the ring's end.
            Some(a) => (a, self.job_at(a).prev),
            None => (slot, slot),
        };
        self.free.remove(&slot);
        let s = &mut self.slots[usize::from(slot)];
        s.job = Some(JobRecord {
            constants,
            device: d,
            data,
            next,
            prev,
        });
        let generation = s.generation;
        if next != slot {
            self.job_at_mut(prev).next = slot;
            self.job_at_mut(next).prev = slot;
        }
        let dev = &mut self.devices[d.0];
        dev.active.get_or_insert(slot);
        dev.count += 1;
        Ok(LinkId {
            mirror: self.mirror,
            slot,
            generation,
        })
    }

    /// The slot of a live job named by `link`.
    fn resolve(&self, link: LinkId) -> Result<u16, JobError> {
        if link.is_invalid() {
            return Err(JobError::InvalidLink);
        }
        let unknown = JobError::UnknownLink(link);
        if link.mirror != self.mirror {
            return Err(unknown);
        }
        match self.slots.get(usize::from(link.slot)) {
            Some(s) if s.generation == link.generation && s.job.is_some() => Ok(link.slot),
            _ => Err(unknown),
        }
    }

    pub fn get(&self, link: LinkId) -> Result<&JobRecord<C, J>, JobError> {
        let slot = self.resolve(link)?;
        Ok(self.job_at(slot))
    }

    pub fn get_mut(&mut self, link: LinkId) -> Result<&mut JobRecord<C, J>, JobError> {
        let slot = self.resolve(link)?;
        Ok(self.job_at_mut(slot))
    }

    /// The device record of a live job (through its shared pointer).
    pub fn device_of(&self, link: LinkId) -> Result<&DeviceRecord<C, S>, JobError> {
        let d = self.get(link)?.device;
        Ok(&self.devices[d.0])
    }

    /// Closes a job: unlinks it from its device's ring, frees its slot and
    /// moves the slot's generation on, so `link` names nothing from now on.
    pub fn close(&mut self, link: LinkId) -> Result<JobRecord<C, J>, JobError> {
        let slot = self.resolve(link)?;
        let s = &mut self.slots[usize::from(slot)];
        let job = s.job.take().expect("resolved");
        // Generation 0 is the invalid link id's: skip it on wrap-around.
        s.generation = s.generation.checked_add(1).unwrap_or(1);
        self.free.insert(slot);
        let dev = &mut self.devices[job.device.0];
        dev.count -= 1;
        if job.next == slot {
            dev.active = None;
        } else {
            if dev.active == Some(slot) {
                dev.active = Some(job.next);
            }
            self.job_at_mut(job.prev).next = job.next;
            self.job_at_mut(job.next).prev = job.prev;
        }
        Ok(job)
    }

    /// Makes `link` its device's active job.
    pub fn activate(&mut self, link: LinkId) -> Result<(), JobError> {
        let slot = self.resolve(link)?;
        let d = self.job_at(slot).device;
        self.devices[d.0].active = Some(slot);
        Ok(())
    }

    /// The device's active job.
    pub fn active(&self, d: DeviceId) -> Option<LinkId> {
        let slot = self.devices.get(d.0)?.active?;
        Some(self.link_of(slot))
    }

    /// The device's jobs, walking the ring forward from the active job, as
    /// many as its job count (seed 002's traversal).
    pub fn jobs_of(&self, d: DeviceId) -> Vec<LinkId> {
        self.walk(d, |j| j.next)
    }

    /// The same ring walked backward.
    pub fn jobs_of_rev(&self, d: DeviceId) -> Vec<LinkId> {
        self.walk(d, |j| j.prev)
    }

    /// Every live job, in slot order.
    pub fn links(&self) -> Vec<LinkId> {
        (0..self.slots.len() as u32)
            .map(|s| s as u16)
            .filter(|s| self.slots[usize::from(*s)].job.is_some())
            .map(|s| self.link_of(s))
            .collect()
    }

    fn walk(&self, d: DeviceId, step: impl Fn(&JobRecord<C, J>) -> u16) -> Vec<LinkId> {
        let Some(dev) = self.devices.get(d.0) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(dev.count);
        let mut at = dev.active;
        for _ in 0..dev.count {
            let Some(s) = at else { break };
            out.push(self.link_of(s));
            at = Some(step(self.job_at(s)));
        }
        out
    }

    fn link_of(&self, slot: u16) -> LinkId {
        LinkId {
            mirror: self.mirror,
            slot,
            generation: self.slots[usize::from(slot)].generation,
        }
    }

    fn job_at(&self, slot: u16) -> &JobRecord<C, J> {
        self.slots[usize::from(slot)]
            .job
            .as_ref()
            .expect("ring points at a live job")
    }

    fn job_at_mut(&mut self, slot: u16) -> &mut JobRecord<C, J> {
        self.slots[usize::from(slot)]
            .job
            .as_mut()
            .expect("ring points at a live job")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    type Table = JobTable<u64, u32, u32>;

    #[test]
    fn full_table_is_an_error_and_a_freed_slot_is_reused_with_a_new_generation() {
        let mut t = Table::new(7, 3);
        let d = t.add_device(4096, 0);
        let links: Vec<_> = (0..3).map(|i| t.open(d, i).unwrap()).collect();
        assert_eq!(
            links.iter().map(|l| l.slot).collect::<Vec<_>>(),
            [0, 1, 2],
            "first free slot"
        );
        assert_eq!(t.open(d, 9), Err(JobError::Full { capacity: 3 }));
        let closed = t.close(links[1]).unwrap();
        assert_eq!(closed.data, 1);
        assert_eq!(closed.constants, 4096, "constants copied from the device");
        let again = t.open(d, 10).unwrap();
        assert_eq!(again.slot, 1);
        assert_ne!(again, links[1]);
        assert_eq!(
            t.get(links[1]).unwrap_err(),
            JobError::UnknownLink(links[1])
        );
        assert_eq!(t.get(again).unwrap().data, 10);
        assert_eq!(t.get(LinkId::INVALID).unwrap_err(), JobError::InvalidLink);
        assert_eq!(LinkId::from_u64(again.to_u64()), again);
        assert_eq!(again.mirror, 7);
    }

    #[test]
    fn ring_per_device_walks_both_ways() {
        let mut t = Table::new(1, 8);
        let a = t.add_device(1, 0);
        let b = t.add_device(2, 0);
        let a1 = t.open(a, 0).unwrap();
        let b1 = t.open(b, 0).unwrap();
        let a2 = t.open(a, 0).unwrap();
        let a3 = t.open(a, 0).unwrap();
        assert_eq!(t.jobs_of(a), [a1, a2, a3]);
        assert_eq!(t.jobs_of_rev(a), [a1, a3, a2]);
        assert_eq!(t.jobs_of(b), [b1]);
        assert_eq!(t.device(a).unwrap().job_count(), 3);
        assert_eq!(t.device_of(a2).unwrap().constants, 1);
        t.activate(a2).unwrap();
        assert_eq!(t.jobs_of(a), [a2, a3, a1]);
        t.close(a2).unwrap();
        assert_eq!(t.active(a), Some(a3));
        assert_eq!(t.jobs_of(a), [a3, a1]);
        t.close(a1).unwrap();
        t.close(a3).unwrap();
        assert_eq!(t.active(a), None);
        assert!(t.jobs_of(a).is_empty());
        assert_eq!(t.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open(usize),
        Close(usize),
        CloseStale(usize),
        Activate(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..3).prop_map(Op::Open),
            2 => any::<usize>().prop_map(Op::Close),
            1 => any::<usize>().prop_map(Op::CloseStale),
            1 => any::<usize>().prop_map(Op::Activate),
        ]
    }

    proptest! {
        /// Against a model: every live job is found by its link id and no
        /// other; closed link ids are refused; live link ids are distinct and
        /// a link id is never issued twice; the first free slot is taken; a
        /// full table refuses; each device's ring holds exactly its jobs,
        /// forward and backward, and its count matches.
        #[test]
        fn table_matches_model(cap in 1usize..12, ops in proptest::collection::vec(op(), 1..300)) {
            let mut t = Table::new(3, cap);
            let devs: Vec<_> = (0..3).map(|i| t.add_device(100 + i as u64, 0)).collect();
            let mut live: HashMap<LinkId, (usize, u32)> = HashMap::new();
            let mut ever: HashSet<LinkId> = HashSet::new();
            let mut dead: Vec<LinkId> = Vec::new();
            let mut n = 0u32;
            for op in ops {
                match op {
                    Op::Open(d) => {
                        n += 1;
                        let used: HashSet<u16> = live.keys().map(|l| l.slot).collect();
                        let first_free = (0..cap as u16).find(|s| !used.contains(s));
                        match t.open(devs[d], n) {
                            Ok(l) => {
                                prop_assert_eq!(Some(l.slot), first_free);
                                prop_assert!(!l.is_invalid());
                                prop_assert!(ever.insert(l), "link id {} issued twice", l);
                                live.insert(l, (d, n));
                            }
                            Err(e) => {
                                prop_assert_eq!(e, JobError::Full { capacity: cap });
                                prop_assert_eq!(live.len(), cap);
                            }
                        }
                    }
                    Op::Close(i) if !live.is_empty() => {
                        let mut ls: Vec<_> = live.keys().copied().collect();
                        ls.sort();
                        let l = ls[i % ls.len()];
                        let (d, data) = live.remove(&l).unwrap();
                        let job = t.close(l).unwrap();
                        prop_assert_eq!(job.data, data);
                        prop_assert_eq!(job.device, devs[d]);
                        prop_assert_eq!(job.constants, 100 + d as u64);
                        dead.push(l);
                    }
                    Op::CloseStale(i) if !dead.is_empty() => {
                        let l = dead[i % dead.len()];
                        prop_assert_eq!(t.close(l).unwrap_err(), JobError::UnknownLink(l));
                    }
                    Op::Activate(i) if !live.is_empty() => {
                        let mut ls: Vec<_> = live.keys().copied().collect();
                        ls.sort();
                        let l = ls[i % ls.len()];
                        t.activate(l).unwrap();
                        prop_assert_eq!(t.active(t.get(l).unwrap().device), Some(l));
                    }
                    _ => {}
                }
                prop_assert_eq!(t.len(), live.len());
                for (l, (_, data)) in &live {
                    prop_assert_eq!(t.get(*l).unwrap().data, *data);
                }
                for l in &dead {
                    prop_assert!(t.get(*l).is_err());
                }
                let mut all: Vec<_> = t.links();
                all.sort();
                let mut want: Vec<_> = live.keys().copied().collect();
                want.sort();
                prop_assert_eq!(all, want);
                for (i, d) in devs.iter().enumerate() {
                    let fwd = t.jobs_of(*d);
                    let mut bwd = t.jobs_of_rev(*d);
                    let mut mine: Vec<_> = live.iter().filter(|(_, (dd, _))| *dd == i).map(|(l, _)| *l).collect();
                    prop_assert_eq!(t.device(*d).unwrap().job_count(), mine.len());
                    prop_assert_eq!(fwd.len(), mine.len());
                    // Backward from the active job: the same ring reversed
                    // after its first element.
                    if !bwd.is_empty() {
                        bwd[1..].reverse();
                    }
                    prop_assert_eq!(&fwd, &bwd);
                    let mut f = fwd.clone();
                    f.sort();
                    mine.sort();
                    prop_assert_eq!(f, mine);
                }
            }
        }

        #[test]
        fn link_ids_roundtrip(v in any::<u64>()) {
            prop_assert_eq!(LinkId::from_u64(v).to_u64(), v);
        }
    }
}
