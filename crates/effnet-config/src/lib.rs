//! The job spec (placeholder until the schema lands).
