//! Whether one backup or drill of a service in a repository succeeded, as records,
//! status, metrics and reports say it.

use serde::{Deserialize, Serialize};

/// `ok` or `failed` (the words the JSON records and `agex status` use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It succeeded.
    Ok,
    /// It failed.
    Failed,
}

impl Verdict {
    /// `ok` for a success, else `failed`.
    pub fn of(ok: bool) -> Verdict {
        if ok {
            Verdict::Ok
        } else {
            Verdict::Failed
        }
    }

    /// Whether it succeeded.
    pub fn is_ok(self) -> bool {
        self == Verdict::Ok
    }

    /// The word: `ok` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_words_are_the_ones_records_always_held() {
        for (v, word) in [(Verdict::Ok, "ok"), (Verdict::Failed, "failed")] {
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{word}\""));
            assert_eq!(
                serde_json::from_str::<Verdict>(&format!("\"{word}\"")).unwrap(),
                v
            );
            assert_eq!(v.to_string(), word);
        }
        assert!(serde_json::from_str::<Verdict>("\"skipped\"").is_err());
    }
}
