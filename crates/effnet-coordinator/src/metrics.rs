//! `/metrics` in the Prometheus text format (0.0.4): jobs by state, workers by job and state,
//! and per job its step, throughput, loss, restarts and the age of its newest checkpoint.

use std::fmt::Write as _;

use crate::protocol::{JobState, JobSummary, MemberState};

/// A label value with `\`, `"` and line breaks escaped as the format requires.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders the metrics of `jobs` and the member counts `(job, state, count)` at time `now`.
pub fn render(jobs: &[JobSummary], members: &[(String, MemberState, u64)], now: f64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let by_state = JobState::ALL
        .iter()
        .map(|state| {
            let count = jobs.iter().filter(|job| job.state == *state).count();
            (format!("{{state=\"{state}\"}}"), count as f64)
        })
        .collect();
    family("effnet_jobs", "Jobs by state.", "gauge", by_state);
    let workers = members
        .iter()
        .map(|(job, state, count)| {
            (format!("{{job=\"{}\",state=\"{}\"}}", label(job), state.as_str()), *count as f64)
        })
        .collect();
    family("effnet_workers", "Workers of each job by state (all generations).", "gauge", workers);
    let per_job = |value: &dyn Fn(&JobSummary) -> Option<f64>| -> Vec<(String, f64)> {
        jobs.iter()
            .filter_map(|job| value(job).map(|v| (format!("{{job=\"{}\"}}", label(&job.id)), v)))
            .collect()
    };
    family(
        "effnet_job_step",
        "Highest step reported by the newest generation.",
        "gauge",
        per_job(&|job| job.step.map(|s| s as f64)),
    );
    family(
        "effnet_job_images_per_second",
        "Training throughput summed over the newest generation's workers.",
        "gauge",
        per_job(&|job| job.images_per_s),
    );
    family("effnet_job_loss", "Rank 0's latest training loss.", "gauge", per_job(&|job| job.loss));
    family(
        "effnet_job_restarts",
        "Generations started after the first.",
        "counter",
        per_job(&|job| Some(f64::from(job.restarts))),
    );
    family(
        "effnet_job_generation",
        "The newest generation's number.",
        "gauge",
        per_job(&|job| Some(f64::from(job.generation))),
    );
    family(
        "effnet_job_last_checkpoint_age_seconds",
        "Seconds since a worker reported the job's newest checkpoint.",
        "gauge",
        per_job(&|job| job.last_checkpoint.as_ref().map(|c| (now - c.reported_at).max(0.0))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::LastCheckpoint;

    fn job(id: &str, state: JobState) -> JobSummary {
        JobSummary {
            id: id.into(),
            name: "demo".into(),
            state,
            created_at: 0.0,
            updated_at: 0.0,
            restarts: 2,
            world_size: 2,
            generation: 3,
            generation_state: None,
            workers: 2,
            step: Some(120),
            epoch: Some(1.5),
            images_per_s: Some(812.5),
            loss: Some(0.25),
            last_checkpoint: Some(LastCheckpoint {
                step: 100,
                url: "file:///c/step-100".into(),
                reported_at: 90.0,
            }),
            reason: None,
            max_restarts: 3,
        }
    }

    #[test]
    fn renders_every_family_with_values() {
        let jobs = [job("demo-1", JobState::Running), job("demo-\"2", JobState::Cancelled)];
        let members = [("demo-1".to_string(), MemberState::Active, 2)];
        let text = render(&jobs, &members, 100.0);
        for line in [
            "effnet_jobs{state=\"running\"} 1",
            "effnet_jobs{state=\"cancelled\"} 1",
            "effnet_jobs{state=\"queued\"} 0",
            "effnet_workers{job=\"demo-1\",state=\"active\"} 2",
            "effnet_job_step{job=\"demo-1\"} 120",
            "effnet_job_images_per_second{job=\"demo-1\"} 812.5",
            "effnet_job_loss{job=\"demo-1\"} 0.25",
            "effnet_job_restarts{job=\"demo-1\"} 2",
            "effnet_job_last_checkpoint_age_seconds{job=\"demo-1\"} 10",
            "effnet_job_step{job=\"demo-\\\"2\"} 120",
            "# TYPE effnet_job_restarts counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
