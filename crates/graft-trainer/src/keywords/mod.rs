//! Task 2 of the challenge: a paper's keywords. Extractors share one trait
//! ([`KeywordExtractor`]); [`score`] compares them with gold keywords; the report split
//! ([`is_report_row`]) keeps the rows they are scored on out of every training set.
pub mod generative;
mod paper;
pub mod score;
pub mod statistical;
pub mod tagged;

pub use generative::GenerativeExtractor;
pub use paper::{
    format_keywords, is_report_row, parse_keywords, read_papers, KeywordExtractor, Paper,
    WithFallback, REPORT_EVERY,
};
pub use score::{score, KeywordScores};
pub use statistical::{StatisticalExtractor, StatisticalSettings};
pub use tagged::TaggingExtractor;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Result;

    #[test]
    fn keyword_lists_split_on_semicolons_then_commas_and_lose_the_final_stop() {
        assert_eq!(
            parse_keywords("Flow cytometry; HDACi; Leukemia; ROS."),
            ["Flow cytometry", "HDACi", "Leukemia", "ROS"]
        );
        assert_eq!(
            parse_keywords("rubella, Congenital Rubella Syndrome, Vietnam."),
            ["rubella", "Congenital Rubella Syndrome", "Vietnam"]
        );
        // A comma inside a semicolon list belongs to its keyword.
        assert_eq!(parse_keywords("a, b; c"), ["a, b", "c"]);
        // Repeats after normalisation and empty entries go.
        assert_eq!(
            parse_keywords("Shiny; shiny ; ; web-application; Web application"),
            ["Shiny", "web-application"]
        );
        assert!(parse_keywords(" ; . ").is_empty());
        assert_eq!(
            format_keywords(&parse_keywords("x; y.")),
            "x; y",
            "format and parse round-trip"
        );
    }

    #[test]
    fn the_report_split_holds_out_every_fifth_row_from_the_first() {
        let report: Vec<usize> = (0..12).filter(|&i| is_report_row(i, 5)).collect();
        assert_eq!(report, [0, 5, 10]);
        assert!(!(0..12).any(|i| is_report_row(i, 0)));
        assert_eq!(
            (0..2358)
                .filter(|&i| is_report_row(i, REPORT_EVERY))
                .count(),
            472
        );
    }

    struct Fixed(Vec<String>);
    impl KeywordExtractor for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn extract(&self, _: &Paper) -> Result<Vec<String>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn the_fallback_answers_only_where_the_primary_found_nothing() {
        let (columns, fields) = (vec!["title".to_string()], vec!["t".to_string()]);
        let paper = Paper::new(&columns, &fields);
        let (empty, some, other) = (
            Fixed(vec![]),
            Fixed(vec!["a".into()]),
            Fixed(vec!["b".into()]),
        );
        let both = WithFallback::new(&some, &other);
        assert_eq!(both.extract(&paper).unwrap(), ["a"]);
        assert_eq!(both.fell_back(), 0);
        let both = WithFallback::new(&empty, &other);
        assert_eq!(both.extract(&paper).unwrap(), ["b"]);
        assert_eq!(both.fell_back(), 1);
        assert_eq!(paper.title(), "t");
        assert_eq!(paper.abstract_text(), "");
    }
}
