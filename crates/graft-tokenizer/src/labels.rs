use crate::error::{Error, Result};

/// Ordered class labels: the index of a label is its class id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSet {
    labels: Vec<String>,
}

impl LabelSet {
    /// Labels are trimmed of surrounding whitespace; empty or repeated labels are an error.
    pub fn new(labels: Vec<String>) -> Result<Self> {
        if labels.is_empty() {
            return Err(Error::EmptyLabelSet);
        }
        let mut trimmed: Vec<String> = Vec::with_capacity(labels.len());
        for (i, label) in labels.iter().enumerate() {
            let label = label.trim();
            if label.is_empty() {
                return Err(Error::EmptyLabel { position: i + 1 });
            }
            if let Some(first) = trimmed.iter().position(|l| l == label) {
                return Err(Error::DuplicateLabel {
                    label: label.to_string(),
                    first: first + 1,
                    second: i + 1,
                });
            }
            trimmed.push(label.to_string());
        }
        Ok(Self { labels: trimmed })
    }

    /// Class id of `value`, compared exactly after trimming surrounding whitespace.
    pub fn index_of(&self, value: &str) -> Option<usize> {
        let value = value.trim();
        self.labels.iter().position(|l| l == value)
    }

    /// The label of class `index`.
    pub fn label(&self, index: usize) -> Option<&str> {
        self.labels.get(index).map(|l| l.as_str())
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Always false: `new` refuses an empty set.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> Result<LabelSet> {
        LabelSet::new(items.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn index_of_trims_the_value() {
        let labels = set(&["0", "1"]).unwrap();
        assert_eq!(labels.len(), 2);
        assert!(!labels.is_empty());
        assert_eq!(labels.index_of("0"), Some(0));
        assert_eq!(labels.index_of(" 1\r\n"), Some(1));
        assert_eq!(labels.index_of("2"), None);
        assert_eq!(labels.index_of(""), None);
        assert_eq!(labels.index_of("01"), None);
        assert_eq!(labels.label(1), Some("1"));
        assert_eq!(labels.label(2), None);
        assert_eq!(labels.labels(), &["0".to_string(), "1".to_string()]);
    }

    #[test]
    fn labels_are_trimmed_and_case_sensitive() {
        let labels = set(&[" yes ", "Yes"]).unwrap();
        assert_eq!(labels.labels(), &["yes".to_string(), "Yes".to_string()]);
        assert_eq!(labels.index_of("Yes"), Some(1));
    }

    #[test]
    fn empty_set_is_an_error() {
        assert!(matches!(set(&[]), Err(Error::EmptyLabelSet)));
    }

    #[test]
    fn empty_label_is_an_error() {
        let err = set(&["a", "  "]).unwrap_err();
        assert!(matches!(err, Error::EmptyLabel { position: 2 }), "{err}");
    }

    #[test]
    fn duplicate_label_names_both_positions() {
        let err = set(&["0", "1", " 0"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::DuplicateLabel { label, first: 1, second: 3 } if label == "0"),
            "{msg}"
        );
        assert!(msg.contains("positions 1 and 3"), "{msg}");
    }
}
