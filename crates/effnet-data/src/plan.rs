//! Shard plans: which rows each rank reads in an epoch, and how a saved cursor is re-split.
//!
//! The unit of sharding is the row group (64–256 images, a few MB, one ranged GET). Per epoch a
//! seeded permutation of all row groups (seed = mix(job seed, epoch)) is dealt round-robin to the
//! ranks, so counts are balanced to within one row group. With fewer row groups than ranks, row
//! groups are cut into row slices first, so no rank idles while another works.
//!
//! A [`DataCursor`] (saved with every checkpoint) records, per rank, how many of its units have
//! entered the shuffle buffer and which samples are still in that buffer. Resuming re-deals
//! exactly the remaining units and pending samples over the new world size: nothing is lost and
//! nothing repeats, whatever the new number of ranks.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{SplitMix64, mix_seed};

/// One row group of the dataset, in manifest order (`id` is its position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroupRef {
    pub id: u32,
    pub file: u32,
    /// Index of the row group inside its file.
    pub index: u32,
    pub rows: u32,
}

/// A contiguous run of rows `[start, end)` of one row group: what a rank reads in one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkUnit {
    pub row_group: u32,
    pub start: u32,
    pub end: u32,
}

impl WorkUnit {
    pub fn rows(&self) -> u32 {
        self.end - self.start
    }
}

/// One sample by position: row `row` of row group `row_group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleRef {
    pub row_group: u32,
    pub row: u32,
}

/// What one rank reads in (the rest of) an epoch: first the `pending` samples (left in a shuffle
/// buffer when the cursor was saved), then the `units` in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankWork {
    pub pending: Vec<SampleRef>,
    pub units: Vec<WorkUnit>,
}

impl RankWork {
    pub fn samples(&self) -> u64 {
        self.pending.len() as u64 + self.units.iter().map(|u| u.rows() as u64).sum::<u64>()
    }
}

/// The work of every rank for one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochPlan {
    pub seed: u64,
    pub epoch: u64,
    /// Bumped each time the epoch is re-split on resume; seeds the new shuffle streams.
    pub generation: u32,
    pub ranks: Vec<RankWork>,
}

impl EpochPlan {
    /// A fresh epoch: permute all row groups with `mix(seed, epoch)` and deal them out.
    pub fn new(seed: u64, epoch: u64, row_groups: &[RowGroupRef], world_size: usize) -> Result<Self> {
        check_world_size(world_size)?;
        let mut order: Vec<WorkUnit> =
            row_groups.iter().map(|g| WorkUnit { row_group: g.id, start: 0, end: g.rows }).collect();
        SplitMix64::new(mix_seed(&[seed, epoch])).shuffle(&mut order);
        let ranks = deal(order, Vec::new(), world_size)?;
        Ok(EpochPlan { seed, epoch, generation: 0, ranks })
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    pub fn samples(&self) -> u64 {
        self.ranks.iter().map(RankWork::samples).sum()
    }

    /// Check that this plan deals every row of `row_groups` exactly once, to `world_size` ranks:
    /// what a worker verifies of a plan it did not compute (a coordinator's).
    pub fn check_covers(&self, row_groups: &[RowGroupRef], world_size: usize) -> Result<()> {
        let invalid = |reason: String| Error::InvalidPlan { reason };
        if self.world_size() != world_size {
            return Err(invalid(format!(
                "a plan for {} ranks, this run has {world_size}",
                self.world_size()
            )));
        }
        if self.ranks.iter().any(|rank| !rank.pending.is_empty()) {
            return Err(invalid("a fresh epoch's plan with pending samples".into()));
        }
        let whole: Vec<WorkUnit> =
            row_groups.iter().map(|g| WorkUnit { row_group: g.id, start: 0, end: g.rows }).collect();
        let rows: u64 = whole.iter().map(|u| u.rows() as u64).sum();
        let dealt = merged(self.ranks.iter().flat_map(|r| r.units.iter().copied()), std::iter::empty());
        if self.samples() != rows || dealt != merged(whole, std::iter::empty()) {
            return Err(invalid(format!(
                "epoch {}'s plan does not deal every row of the dataset exactly once",
                self.epoch
            )));
        }
        Ok(())
    }

    /// Seed of rank `rank`'s shuffle buffer in this plan.
    pub fn shuffle_seed(&self, rank: usize) -> u64 {
        mix_seed(&[self.seed, self.epoch, self.generation as u64, rank as u64])
    }
}

fn check_world_size(world_size: usize) -> Result<()> {
    if world_size == 0 {
        return Err(Error::InvalidPlan { reason: "world size must be at least 1, got 0".into() });
    }
    Ok(())
}

/// Deal units round-robin (balanced within one unit) and pending samples round-robin. Units are
/// cut into row slices first when there are fewer of them than ranks.
fn deal(units: Vec<WorkUnit>, pending: Vec<SampleRef>, world_size: usize) -> Result<Vec<RankWork>> {
    let total_rows: u64 = units.iter().map(|u| u.rows() as u64).sum::<u64>() + pending.len() as u64;
    if total_rows > 0 && total_rows < world_size as u64 {
        return Err(Error::InvalidPlan {
            reason: format!("{total_rows} samples cannot give work to each of {world_size} ranks"),
        });
    }
    let units = if !units.is_empty() && units.len() + pending.len() < world_size {
        split_units(units, world_size - pending.len().min(world_size))
    } else {
        units
    };
    let mut ranks = vec![RankWork::default(); world_size];
    // Pending samples first, then units continuing the same rotation, so that a rank short of
    // pending samples is the first to get a unit.
    for (i, sample) in pending.into_iter().enumerate() {
        ranks[i % world_size].pending.push(sample);
    }
    let mut order: Vec<usize> = (0..world_size).collect();
    order.sort_by_key(|&r| (ranks[r].pending.len(), r));
    for (i, unit) in units.into_iter().enumerate() {
        ranks[order[i % world_size]].units.push(unit);
    }
    Ok(ranks)
}

/// Cut units into row slices until there are at least `wanted` of them (largest first).
fn split_units(mut units: Vec<WorkUnit>, wanted: usize) -> Vec<WorkUnit> {
    while units.len() < wanted {
        let (index, largest) = match units.iter().enumerate().max_by_key(|(i, u)| (u.rows(), usize::MAX - i))
        {
            Some((index, unit)) if unit.rows() > 1 => (index, *unit),
            _ => break,
        };
        let middle = largest.start + largest.rows() / 2;
        units[index] = WorkUnit { end: middle, ..largest };
        units.insert(index + 1, WorkUnit { start: middle, ..largest });
    }
    units
}

/// Where one rank is in its [`RankWork`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankCursor {
    /// Units (of `RankWork::units`) whose samples have all entered the shuffle buffer.
    pub units_consumed: usize,
    /// Samples loaded but not yet emitted, in shuffle-buffer order (includes any of
    /// `RankWork::pending` not emitted yet).
    pub buffered: Vec<SampleRef>,
    /// Shuffle generator state, so a resume at the same world size repeats the same order.
    pub shuffle_state: u64,
    /// Samples emitted by this rank so far in this plan.
    pub emitted: u64,
}

/// The data position saved with a checkpoint: the plan being executed and every rank's cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub plan: EpochPlan,
    pub ranks: Vec<RankCursor>,
}

impl DataCursor {
    /// Samples not yet emitted by any rank.
    pub fn remaining(&self) -> u64 {
        self.plan
            .ranks
            .iter()
            .zip(&self.ranks)
            .map(|(work, cursor)| {
                cursor.buffered.len() as u64
                    + work.units[cursor.units_consumed.min(work.units.len())..]
                        .iter()
                        .map(|u| u.rows() as u64)
                        .sum::<u64>()
            })
            .sum()
    }

    /// The samples not yet emitted by any rank, as sorted, merged row ranges; `None` when some
    /// sample is there twice. Two cursors with equal ranges hold the same rest of the epoch,
    /// however it is dealt.
    pub fn remaining_rows(&self) -> Option<Vec<WorkUnit>> {
        let units = self.plan.ranks.iter().zip(&self.ranks).flat_map(|(work, cursor)| {
            work.units[cursor.units_consumed.min(work.units.len())..].iter().copied()
        });
        let samples = self.ranks.iter().flat_map(|cursor| cursor.buffered.iter().copied());
        let rows = merged(units, samples);
        let total: u64 = rows.iter().map(|u| u.rows() as u64).sum();
        (total == self.remaining()).then_some(rows)
    }

    /// Validate the cursor against its plan (a cursor from another dataset or a corrupt file).
    pub fn validate(&self) -> Result<()> {
        if self.ranks.len() != self.plan.ranks.len() {
            return Err(Error::InvalidCursor {
                reason: format!(
                    "{} rank cursors for a plan of {} ranks",
                    self.ranks.len(),
                    self.plan.ranks.len()
                ),
            });
        }
        for (rank, (work, cursor)) in self.plan.ranks.iter().zip(&self.ranks).enumerate() {
            if cursor.units_consumed > work.units.len() {
                return Err(Error::InvalidCursor {
                    reason: format!(
                        "rank {rank} consumed {} units of {}",
                        cursor.units_consumed,
                        work.units.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The rest of the epoch for `world_size` ranks. At the world size the cursor was saved with,
    /// each rank continues exactly where it was (same buffer, same generator state), so the
    /// sample sequence equals an uninterrupted run; at another world size the remaining units and
    /// buffered samples are re-dealt under a new generation.
    pub fn resume(&self, world_size: usize) -> Result<(EpochPlan, Vec<RankCursor>)> {
        check_world_size(world_size)?;
        self.validate()?;
        if world_size == self.plan.world_size() {
            return Ok((self.plan.clone(), self.ranks.clone()));
        }
        let mut units = Vec::new();
        let mut pending = Vec::new();
        for (work, cursor) in self.plan.ranks.iter().zip(&self.ranks) {
            pending.extend_from_slice(&cursor.buffered);
            units.extend_from_slice(&work.units[cursor.units_consumed..]);
        }
        let ranks = deal(units, pending, world_size)?;
        let plan = EpochPlan {
            seed: self.plan.seed,
            epoch: self.plan.epoch,
            generation: self.plan.generation + 1,
            ranks,
        };
        let cursors = initial_cursors(&plan);
        Ok((plan, cursors))
    }
}

/// Units and single samples as sorted row ranges, adjacent and overlapping ones merged (so
/// overlaps shrink the total: callers compare it with the count they expect).
fn merged(
    units: impl IntoIterator<Item = WorkUnit>,
    samples: impl IntoIterator<Item = SampleRef>,
) -> Vec<WorkUnit> {
    let mut all: Vec<WorkUnit> = units
        .into_iter()
        .chain(samples.into_iter().map(|s| WorkUnit { row_group: s.row_group, start: s.row, end: s.row + 1 }))
        .filter(|u| u.end > u.start)
        .collect();
    all.sort_by_key(|u| (u.row_group, u.start, u.end));
    let mut out: Vec<WorkUnit> = Vec::with_capacity(all.len());
    for unit in all {
        match out.last_mut() {
            Some(last) if last.row_group == unit.row_group && unit.start <= last.end => {
                last.end = last.end.max(unit.end)
            }
            _ => out.push(unit),
        }
    }
    out
}

/// A bounded shuffle buffer over sample references with its own generator: fill with the
/// samples of the next unit while below capacity, emit a uniformly chosen one.
#[derive(Clone, Debug)]
pub struct ShuffleBuffer {
    capacity: usize,
    items: Vec<SampleRef>,
    rng: SplitMix64,
}

impl ShuffleBuffer {
    pub fn new(capacity: usize, state: u64, items: Vec<SampleRef>) -> Self {
        ShuffleBuffer { capacity: capacity.max(1), items, rng: SplitMix64::new(state) }
    }

    pub fn wants_more(&self) -> bool {
        self.items.len() < self.capacity
    }

    pub fn extend(&mut self, samples: impl IntoIterator<Item = SampleRef>) {
        self.items.extend(samples);
    }

    pub fn pop(&mut self) -> Option<SampleRef> {
        if self.items.is_empty() {
            return None;
        }
        let index = self.rng.below(self.items.len());
        Some(self.items.swap_remove(index))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// (buffered samples in order, generator state) for a [`RankCursor`].
    pub fn snapshot(&self) -> (Vec<SampleRef>, u64) {
        (self.items.clone(), self.rng.state)
    }
}

/// Run a rank's work through a shuffle buffer without I/O: the order in which the reader emits
/// samples. The reader uses the same steps with row-group fetches in between.
pub fn simulate_rank(
    work: &RankWork,
    cursor: &RankCursor,
    capacity: usize,
    limit: Option<u64>,
) -> (Vec<SampleRef>, RankCursor) {
    let mut buffer = ShuffleBuffer::new(capacity, cursor.shuffle_state, cursor.buffered.clone());
    let mut units_consumed = cursor.units_consumed;
    let mut emitted = cursor.emitted;
    let mut out = Vec::new();
    loop {
        if limit.is_some_and(|l| out.len() as u64 >= l) {
            break;
        }
        while buffer.wants_more() && units_consumed < work.units.len() {
            let unit = work.units[units_consumed];
            buffer.extend((unit.start..unit.end).map(|row| SampleRef { row_group: unit.row_group, row }));
            units_consumed += 1;
        }
        match buffer.pop() {
            Some(sample) => {
                out.push(sample);
                emitted += 1;
            }
            None => break,
        }
    }
    let (buffered, shuffle_state) = buffer.snapshot();
    (out, RankCursor { units_consumed, buffered, shuffle_state, emitted })
}

/// The initial cursors of a fresh plan.
pub fn initial_cursors(plan: &EpochPlan) -> Vec<RankCursor> {
    (0..plan.world_size())
        .map(|rank| RankCursor {
            buffered: plan.ranks[rank].pending.clone(),
            shuffle_state: plan.shuffle_seed(rank),
            ..RankCursor::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Row groups of a dataset of `parts` files with `groups` row groups of `rows` rows, the last
    /// row group of each file shorter.
    fn dataset(parts: u32, groups: u32, rows: u32) -> Vec<RowGroupRef> {
        let mut out = Vec::new();
        for file in 0..parts {
            for index in 0..groups {
                let rows = if index == groups - 1 { rows / 2 + 1 } else { rows };
                out.push(RowGroupRef { id: out.len() as u32, file, index, rows });
            }
        }
        out
    }

    fn all_samples(groups: &[RowGroupRef]) -> BTreeSet<SampleRef> {
        groups.iter().flat_map(|g| (0..g.rows).map(move |row| SampleRef { row_group: g.id, row })).collect()
    }

    fn run_epoch(plan: &EpochPlan, cursors: &[RankCursor], capacity: usize) -> Vec<Vec<SampleRef>> {
        plan.ranks
            .iter()
            .zip(cursors)
            .map(|(work, cursor)| simulate_rank(work, cursor, capacity, None).0)
            .collect()
    }

    fn assert_exactly_once(groups: &[RowGroupRef], per_rank: &[Vec<SampleRef>]) {
        let seen: Vec<SampleRef> = per_rank.iter().flatten().copied().collect();
        let unique: BTreeSet<SampleRef> = seen.iter().copied().collect();
        assert_eq!(seen.len(), unique.len(), "{} duplicates", seen.len() - unique.len());
        let expected = all_samples(groups);
        let lost: Vec<&SampleRef> = expected.difference(&unique).take(5).collect();
        assert!(lost.is_empty(), "lost {} samples, e.g. {lost:?}", expected.len() - unique.len());
        assert_eq!(unique.len(), expected.len());
    }

    #[test]
    fn every_world_size_sees_each_sample_once() {
        let groups = dataset(3, 5, 64);
        for world_size in 1..=4 {
            let plan = EpochPlan::new(7, 0, &groups, world_size).unwrap();
            let per_rank = run_epoch(&plan, &initial_cursors(&plan), 100);
            assert_exactly_once(&groups, &per_rank);
            let counts: Vec<usize> = plan.ranks.iter().map(|r| r.units.len()).collect();
            assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");
        }
    }

    #[test]
    fn a_plan_dealt_elsewhere_is_checked_to_cover_the_dataset_once() {
        let groups = dataset(2, 3, 20);
        let plan = EpochPlan::new(5, 1, &groups, 3).unwrap();
        plan.check_covers(&groups, 3).unwrap();
        let err = plan.check_covers(&groups, 2).unwrap_err();
        assert!(err.to_string().contains("a plan for 3 ranks, this run has 2"), "{err}");
        // A row group dealt twice, one missing, or a cut-short unit: refused.
        let mut twice = plan.clone();
        twice.ranks[0].units[0] = twice.ranks[1].units[0];
        assert!(twice.check_covers(&groups, 3).is_err());
        let mut short = plan.clone();
        short.ranks[2].units[0].end -= 1;
        let err = short.check_covers(&groups, 3).unwrap_err();
        assert!(err.to_string().contains("epoch 1's plan does not deal every row"), "{err}");
    }

    #[test]
    fn remaining_rows_are_the_same_however_the_rest_is_dealt() {
        let groups = dataset(3, 4, 30);
        let plan = EpochPlan::new(9, 0, &groups, 2).unwrap();
        let cursors: Vec<RankCursor> = plan
            .ranks
            .iter()
            .zip(initial_cursors(&plan))
            .map(|(work, cursor)| simulate_rank(work, &cursor, 25, Some(41)).1)
            .collect();
        let saved = DataCursor { plan: plan.clone(), ranks: cursors };
        let rows = saved.remaining_rows().unwrap();
        assert_eq!(rows.iter().map(|u| u.rows() as u64).sum::<u64>(), saved.remaining());
        let total: u64 = groups.iter().map(|g| g.rows as u64).sum();
        assert_eq!(saved.remaining(), total - 2 * 41);
        for world in 1..=5 {
            let (plan, ranks) = saved.resume(world).unwrap();
            assert_eq!(DataCursor { plan, ranks }.remaining_rows().unwrap(), rows, "world {world}");
        }
        // A buffered sample that is also in a unit still to read: counted twice, refused.
        let mut doubled = saved.clone();
        let unit = doubled.plan.ranks[0].units[doubled.ranks[0].units_consumed];
        doubled.ranks[1].buffered.push(SampleRef { row_group: unit.row_group, row: unit.start });
        assert_eq!(doubled.remaining_rows(), None);
    }

    #[test]
    fn plan_is_stable_for_a_seed_and_changes_with_epoch() {
        let groups = dataset(2, 4, 10);
        let a = EpochPlan::new(1, 3, &groups, 2).unwrap();
        assert_eq!(a, EpochPlan::new(1, 3, &groups, 2).unwrap());
        assert_ne!(a, EpochPlan::new(1, 4, &groups, 2).unwrap());
        assert_ne!(a, EpochPlan::new(2, 3, &groups, 2).unwrap());
        // Pinned: the permutation for (seed 1, epoch 3) never changes across releases.
        let order: Vec<u32> = a.ranks[0].units.iter().map(|u| u.row_group).collect();
        assert_eq!(order, [1, 5, 7, 2]);
    }

    #[test]
    fn fewer_row_groups_than_ranks_are_split() {
        let groups = vec![RowGroupRef { id: 0, file: 0, index: 0, rows: 10 }];
        let plan = EpochPlan::new(0, 0, &groups, 4).unwrap();
        assert!(plan.ranks.iter().all(|r| r.samples() > 0), "{plan:?}");
        assert_eq!(plan.samples(), 10);
        let per_rank = run_epoch(&plan, &initial_cursors(&plan), 4);
        assert_exactly_once(&groups, &per_rank);
        let err = EpochPlan::new(0, 0, &[RowGroupRef { id: 0, file: 0, index: 0, rows: 2 }], 3).unwrap_err();
        assert!(err.to_string().contains("2 samples"), "{err}");
        assert!(EpochPlan::new(0, 0, &groups, 0).is_err());
    }

    #[test]
    fn resume_mid_epoch_at_other_world_sizes_is_exactly_once() {
        let groups = dataset(4, 6, 50);
        for (before, after) in [(2, 3), (3, 2), (2, 1), (1, 4), (4, 4)] {
            let plan = EpochPlan::new(11, 2, &groups, before).unwrap();
            let cursors = initial_cursors(&plan);
            // Each rank stops after a different number of samples, mid-buffer.
            let mut seen = Vec::new();
            let mut saved = Vec::new();
            for (rank, (work, cursor)) in plan.ranks.iter().zip(&cursors).enumerate() {
                let (emitted, cursor) = simulate_rank(work, cursor, 70, Some(37 + 13 * rank as u64));
                seen.push(emitted);
                saved.push(cursor);
            }
            let cursor = DataCursor { plan: plan.clone(), ranks: saved };
            let emitted_so_far: u64 = seen.iter().map(|s| s.len() as u64).sum();
            assert_eq!(cursor.remaining() + emitted_so_far, all_samples(&groups).len() as u64);
            let (resumed, resumed_cursors) = cursor.resume(after).unwrap();
            assert_eq!(resumed.world_size(), after);
            seen.extend(run_epoch(&resumed, &resumed_cursors, 70));
            assert_exactly_once(&groups, &seen);
        }
    }

    #[test]
    fn resume_at_the_same_world_size_repeats_the_sequence() {
        let groups = dataset(2, 5, 30);
        let plan = EpochPlan::new(5, 1, &groups, 2).unwrap();
        let cursors = initial_cursors(&plan);
        let straight = run_epoch(&plan, &cursors, 50);
        let mut interrupted = Vec::new();
        let mut saved = Vec::new();
        for (work, cursor) in plan.ranks.iter().zip(&cursors) {
            let (first, cursor) = simulate_rank(work, cursor, 50, Some(41));
            interrupted.push(first);
            saved.push(cursor);
        }
        let cursor = DataCursor { plan: plan.clone(), ranks: saved };
        // The cursor survives a JSON round trip (it goes into state.json).
        let cursor: DataCursor = serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
        let (resumed, resumed_cursors) = cursor.resume(2).unwrap();
        for (rank, rest) in run_epoch(&resumed, &resumed_cursors, 50).into_iter().enumerate() {
            interrupted[rank].extend(rest);
        }
        assert_eq!(interrupted, straight);
    }

    #[test]
    fn corrupt_cursor_is_rejected() {
        let groups = dataset(1, 3, 10);
        let plan = EpochPlan::new(0, 0, &groups, 2).unwrap();
        let mut cursors = initial_cursors(&plan);
        cursors[1].units_consumed = 99;
        let err = DataCursor { plan: plan.clone(), ranks: cursors }.resume(3).unwrap_err();
        assert!(err.to_string().contains("rank 1"), "{err}");
        let err = DataCursor { plan, ranks: vec![] }.resume(1).unwrap_err();
        assert!(err.to_string().contains("0 rank cursors"), "{err}");
    }
}
