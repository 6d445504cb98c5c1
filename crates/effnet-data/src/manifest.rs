//! `_manifest.json`: the dataset's table of contents, written LAST so that a prefix without a
//! valid manifest is not a dataset.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::plan::RowGroupRef;

pub const MANIFEST_NAME: &str = "_manifest.json";
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// Free-form description, e.g. `fashion-mnist train`.
    pub name: String,
    /// Class names; labels are indices into this list.
    pub classes: Vec<String>,
    pub files: Vec<PartFile>,
    /// Total samples over all files.
    pub rows: u64,
    /// Inputs that could not be stored (undecodable images...), never silently dropped.
    pub skipped: Vec<SkippedSample>,
    pub created_by: String,
    /// SHA-256 (hex) of this manifest serialised with an empty `checksum`.
    pub checksum: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartFile {
    /// Object name relative to the dataset prefix (`part-00000.parquet`).
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// SHA-256 (hex) of the whole file.
    pub sha256: String,
    pub row_groups: Vec<RowGroupInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowGroupInfo {
    pub rows: u32,
    /// Byte offset of the row group's first column chunk in the file.
    pub offset: u64,
    /// Compressed size in bytes (one ranged GET reads `offset..offset + bytes`).
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedSample {
    /// Where the input came from (file path, or `idx:INDEX`).
    pub source: String,
    pub reason: String,
}

impl Manifest {
    /// Serialise with the checksum filled in.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut sealed = self.clone();
        sealed.checksum = self.compute_checksum()?;
        serde_json::to_vec_pretty(&sealed).map_err(|e| Error::Manifest { reason: e.to_string() })
    }

    fn compute_checksum(&self) -> Result<String> {
        let mut unsealed = self.clone();
        unsealed.checksum = String::new();
        let bytes = serde_json::to_vec(&unsealed).map_err(|e| Error::Manifest { reason: e.to_string() })?;
        Ok(hex(&Sha256::digest(&bytes)))
    }

    /// Parse and check a manifest: schema version, checksum, internal consistency.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::Manifest { reason: format!("not a manifest: {e}") })?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(Error::Manifest {
                reason: format!(
                    "schema version {} is not supported (expected {SCHEMA_VERSION})",
                    manifest.schema_version
                ),
            });
        }
        let expected = manifest.compute_checksum()?;
        if manifest.checksum != expected {
            return Err(Error::Manifest { reason: "checksum mismatch (edited or truncated)".into() });
        }
        if manifest.classes.is_empty() {
            return Err(Error::Manifest { reason: "no classes".into() });
        }
        let mut total: u64 = 0;
        for file in &manifest.files {
            // Sums of u32 group sizes fit in u64 for any manifest that fits in memory; the file
            // totals are the manifest's own claims, so they are added with a check.
            let group_rows: u64 = file.row_groups.iter().map(|g| g.rows as u64).sum();
            if group_rows != file.rows {
                return Err(Error::Manifest {
                    reason: format!(
                        "{}: row groups hold {group_rows} rows, file says {}",
                        file.path, file.rows
                    ),
                });
            }
            total = total.checked_add(file.rows).ok_or_else(|| Error::Manifest {
                reason: format!("{}: rows {} overflow the dataset's total", file.path, file.rows),
            })?;
        }
        if total != manifest.rows {
            return Err(Error::Manifest {
                reason: format!("files hold {total} rows, manifest says {}", manifest.rows),
            });
        }
        Ok(manifest)
    }

    /// All row groups in manifest order, with global ids.
    pub fn row_groups(&self) -> Vec<RowGroupRef> {
        let mut out = Vec::new();
        for (file, part) in self.files.iter().enumerate() {
            for (index, group) in part.row_groups.iter().enumerate() {
                out.push(RowGroupRef {
                    id: out.len() as u32,
                    file: file as u32,
                    index: index as u32,
                    rows: group.rows,
                });
            }
        }
        out
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            name: "test".into(),
            classes: vec!["a".into(), "b".into()],
            files: vec![PartFile {
                path: "part-00000.parquet".into(),
                rows: 5,
                bytes: 100,
                sha256: "00".into(),
                row_groups: vec![
                    RowGroupInfo { rows: 3, offset: 4, bytes: 40 },
                    RowGroupInfo { rows: 2, offset: 44, bytes: 30 },
                ],
            }],
            rows: 5,
            skipped: vec![],
            created_by: "effnet test".into(),
            checksum: String::new(),
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let json = sample().to_json().unwrap();
        let parsed = Manifest::from_json(&json).unwrap();
        assert_eq!(parsed.rows, 5);
        assert_eq!(parsed.checksum.len(), 64);
        let ids: Vec<(u32, u32, u32)> = parsed.row_groups().iter().map(|g| (g.id, g.index, g.rows)).collect();
        assert_eq!(ids, [(0, 0, 3), (1, 1, 2)]);

        let tampered = String::from_utf8(json).unwrap().replace("\"rows\": 3", "\"rows\": 4");
        let err = Manifest::from_json(tampered.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn inconsistent_or_foreign_manifests_are_rejected() {
        let mut bad = sample();
        bad.rows = 6;
        let err = Manifest::from_json(&bad.to_json().unwrap()).unwrap_err();
        assert!(err.to_string().contains("6"), "{err}");
        let mut future = sample();
        future.schema_version = 9;
        assert!(
            Manifest::from_json(&future.to_json().unwrap())
                .unwrap_err()
                .to_string()
                .contains("schema version 9")
        );
        assert!(Manifest::from_json(b"{\"hello\": 1}").is_err());
        assert!(Manifest::from_json(b"").is_err());
    }
}
