//! A rank table: the route of every conv layer of one model, chosen by a calibration (`asymml privacy
//! --calibrate`) or written by hand, and read with `--rank table:FILE`.
//!
//! JSON: `{"model": "vgg16", "layers": [{"conv": "features.0", "rank": "trusted"}, {"conv": "features.2",
//! "rank": 4}, …]}`. `"trusted"` runs the whole conv in the trusted runtime (nothing of its input leaves); a
//! number r ≥ 1 keeps r components trusted and sends the residual. Every conv of the model must be listed.

use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What one conv layer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TableRank {
    /// Keep r components trusted (r ≥ 1, clamped to the layer's channels).
    Rank(usize),
    /// The string `"trusted"`: the whole conv in the trusted runtime.
    Route(TrustedRoute),
}

/// The literal `"trusted"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustedRoute {
    Trusted,
}

/// One conv's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// The conv's name in the model (torchvision naming, e.g. `features.0`, `layer1.0.conv1`).
    pub conv: String,
    pub rank: TableRank,
}

/// The route of every conv of a model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankTable {
    /// The model the table was made for (informational; the conv names are what is matched).
    #[serde(default)]
    pub model: String,
    pub layers: Vec<TableEntry>,
}

impl RankTable {
    /// Reads and checks a table file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Invalid(format!("rank table {}: {e}", path.display())))?;
        let t: RankTable = serde_json::from_str(&text)
            .map_err(|e| CoreError::Invalid(format!("rank table {}: {e}", path.display())))?;
        t.check()
            .map_err(|e| CoreError::Invalid(format!("rank table {}: {e}", path.display())))?;
        Ok(t)
    }

    /// Ranks are at least 1 and every conv is listed once.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for e in &self.layers {
            if e.rank == TableRank::Rank(0) {
                return Err(format!(
                    "conv {}: rank 0 (use a rank ≥ 1 or \"trusted\")",
                    e.conv
                ));
            }
            if !seen.insert(e.conv.as_str()) {
                return Err(format!("conv {} is listed twice", e.conv));
            }
        }
        Ok(())
    }

    /// The entry of conv `name`.
    pub fn get(&self, name: &str) -> Option<TableRank> {
        self.layers.iter().find(|e| e.conv == name).map(|e| e.rank)
    }

    /// Every name in `convs` has an entry, and every entry names one of them.
    pub fn check_covers<'a>(&self, convs: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let names: Vec<&str> = convs.into_iter().collect();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| self.get(n).is_none())
            .collect();
        let unknown: Vec<&str> = self
            .layers
            .iter()
            .map(|e| e.conv.as_str())
            .filter(|c| !names.contains(c))
            .collect();
        if !missing.is_empty() || !unknown.is_empty() {
            return Err(CoreError::Invalid(format!(
                "rank table does not fit the model: missing convs {missing:?}, unknown convs {unknown:?}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranks_and_trusted() {
        let t: RankTable = serde_json::from_str(
            r#"{"model":"vgg16","layers":[{"conv":"a","rank":"trusted"},{"conv":"b","rank":4}]}"#,
        )
        .unwrap();
        assert_eq!(t.get("a"), Some(TableRank::Route(TrustedRoute::Trusted)));
        assert_eq!(t.get("b"), Some(TableRank::Rank(4)));
        assert!(t.check().is_ok());
        assert!(t.check_covers(["a", "b"]).is_ok());
        assert!(t.check_covers(["a"]).is_err());
        assert!(t.check_covers(["a", "b", "c"]).is_err());
        let back: RankTable = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let zero: RankTable =
            serde_json::from_str(r#"{"layers":[{"conv":"a","rank":0}]}"#).unwrap();
        assert!(zero.check().is_err());
        assert!(
            serde_json::from_str::<RankTable>(r#"{"layers":[{"conv":"a","rank":"x"}]}"#).is_err()
        );
    }
}
