//! Rank and world size from the launcher's environment.

use crate::{Error, Result};

/// Where this process sits in the job, as its launcher says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node: the CUDA device this process drives.
    pub local_rank: usize,
    /// Which variables it came from (`torchrun`, `kubernetes`, `slurm`, `openmpi`, or `single`
    /// when none).
    pub source: &'static str,
}

/// The launchers we read, in order: (name, rank, world size, local rank).
const LAUNCHERS: [(&str, &str, &str, &str); 4] = [
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    // An Indexed Job's pod: its completion index is the rank; the manifest sets WORLD_SIZE to
    // the Job's parallelism (one pod per GPU, so the local rank is 0).
    ("kubernetes", "JOB_COMPLETION_INDEX", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
];

impl WorldInfo {
    pub fn single() -> WorldInfo {
        WorldInfo { rank: 0, world_size: 1, local_rank: 0, source: "single" }
    }

    /// `RANK`/`WORLD_SIZE`/`LOCAL_RANK` (torchrun and most launchers), else a Kubernetes Indexed
    /// Job's `JOB_COMPLETION_INDEX` with `WORLD_SIZE`, else Slurm's
    /// `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, else Open MPI's `OMPI_COMM_WORLD_*`, else a
    /// world of one. A variable that is set but malformed is an error naming it.
    pub fn from_env() -> Result<WorldInfo> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<WorldInfo> {
        for (source, rank_var, world_var, local_var) in LAUNCHERS {
            let (Some(rank), Some(world)) = (get(rank_var), get(world_var)) else {
                continue;
            };
            let number = |name: &str, value: &str| {
                value.trim().parse::<usize>().map_err(|_| Error::Invalid {
                    what: name.to_string(),
                    reason: format!("expected a non-negative integer, got {value:?}"),
                })
            };
            let rank = number(rank_var, &rank)?;
            let world_size = number(world_var, &world)?;
            if world_size == 0 || rank >= world_size {
                return Err(Error::Invalid {
                    what: format!("{rank_var}/{world_var}"),
                    reason: format!("rank {rank} does not fit a world of {world_size}"),
                });
            }
            let local_rank = match get(local_var) {
                Some(value) => number(local_var, &value)?,
                None => 0,
            };
            return Ok(WorldInfo { rank, world_size, local_rank, source });
        }
        Ok(WorldInfo::single())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn torchrun_variables_win_over_slurm() {
        let info = WorldInfo::from_lookup(lookup(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]))
        .unwrap();
        assert_eq!(info, WorldInfo { rank: 3, world_size: 8, local_rank: 3, source: "torchrun" });
    }

    #[test]
    fn slurm_and_openmpi_are_read() {
        let slurm = WorldInfo::from_lookup(lookup(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ]))
        .unwrap();
        assert_eq!(slurm, WorldInfo { rank: 5, world_size: 16, local_rank: 1, source: "slurm" });
        let ompi =
            WorldInfo::from_lookup(lookup(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]))
                .unwrap();
        assert_eq!(ompi, WorldInfo { rank: 1, world_size: 2, local_rank: 0, source: "openmpi" });
        assert_eq!(WorldInfo::from_lookup(lookup(&[])).unwrap(), WorldInfo::single());
    }

    #[test]
    fn a_kubernetes_indexed_job_gives_the_rank_by_its_completion_index() {
        let pod =
            WorldInfo::from_lookup(lookup(&[("JOB_COMPLETION_INDEX", "2"), ("WORLD_SIZE", "4")])).unwrap();
        assert_eq!(pod, WorldInfo { rank: 2, world_size: 4, local_rank: 0, source: "kubernetes" });
        // An explicit RANK wins; an index without WORLD_SIZE is no launcher of several.
        let explicit = WorldInfo::from_lookup(lookup(&[
            ("RANK", "1"),
            ("JOB_COMPLETION_INDEX", "3"),
            ("WORLD_SIZE", "4"),
        ]))
        .unwrap();
        assert_eq!((explicit.rank, explicit.source), (1, "torchrun"));
        assert_eq!(
            WorldInfo::from_lookup(lookup(&[("JOB_COMPLETION_INDEX", "0")])).unwrap(),
            WorldInfo::single()
        );
        let error = WorldInfo::from_lookup(lookup(&[("JOB_COMPLETION_INDEX", "4"), ("WORLD_SIZE", "4")]))
            .unwrap_err();
        assert_eq!(error.to_string(), "JOB_COMPLETION_INDEX/WORLD_SIZE: rank 4 does not fit a world of 4");
    }

    #[test]
    fn malformed_values_are_named() {
        let error = WorldInfo::from_lookup(lookup(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(error.to_string(), "RANK: expected a non-negative integer, got \"x\"");
        let error = WorldInfo::from_lookup(lookup(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(error.to_string(), "RANK/WORLD_SIZE: rank 2 does not fit a world of 2");
    }
}
