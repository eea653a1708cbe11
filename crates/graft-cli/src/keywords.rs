//! `graft keywords-eval` and the Keywords column of `graft predict --submission`.
use anyhow::{bail, Context, Result};
use graft_model::models::bert::Pooling;
use graft_peft::loader::Registry;
use graft_trainer::data::Dataset;
use graft_trainer::keywords::{
    format_keywords, is_report_row, parse_keywords, read_papers, score, GenerativeExtractor,
    KeywordExtractor, Paper, StatisticalExtractor, StatisticalSettings, TaggingExtractor,
    WithFallback,
};
use graft_trainer::task::TaskSpec;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A tagger's default cut (`--min-score`).
const DEFAULT_MIN_SCORE: f64 = 0.5;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// CSV with title, abstract and the gold Keywords (challenge_test.csv).
    #[arg(long)]
    data: PathBuf,
    /// A keyword adapter: a token classifier written by `graft train` (the tagging extractor)
    /// or a decoder adapter written by `graft train-lm` (the generative one); without it, the
    /// statistical baseline, fitted on the training rows' titles and abstracts.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Rows whose 0-based index is a multiple of this are the report rows.
    #[arg(long, default_value_t = graft_trainer::keywords::REPORT_EVERY)]
    every: usize,
    /// Score the training rows instead of the report rows (to tune without looking at them).
    #[arg(long)]
    training_rows: bool,
    /// Score only the first N rows of the chosen split (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// The generated answer's cap, in tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// A tagger's cut: the least mean tag probability of a span kept as a keyword.
    #[arg(long, default_value_t = DEFAULT_MIN_SCORE)]
    min_score: f64,
    /// Write the figures and every scored row's keywords as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct ScoredRow<'a> {
    uuid: &'a str,
    /// 0-based data row index.
    index: usize,
    gold: Vec<String>,
    predicted: Vec<String>,
}

#[derive(Serialize)]
struct EvalReport<'a> {
    extractor: &'a str,
    data: &'a Path,
    split: String,
    seconds: f64,
    #[serde(flatten)]
    scores: graft_trainer::keywords::KeywordScores,
    rows: Vec<ScoredRow<'a>>,
}

/// A line at most every ten seconds, with the time left, for extraction that takes minutes.
struct Progress {
    started: Instant,
    last: std::cell::Cell<Instant>,
    total: usize,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            started: Instant::now(),
            last: std::cell::Cell::new(Instant::now()),
            total,
        }
    }

    fn done(&self, count: usize) {
        if self.last.get().elapsed().as_secs_f64() < 10.0 {
            return;
        }
        self.last.set(Instant::now());
        let per_row = self.started.elapsed().as_secs_f64() / count as f64;
        eprintln!(
            "keywords: {count}/{} rows, {per_row:.2} s a row, {:.0} s left",
            self.total,
            per_row * (self.total - count) as f64
        );
    }
}

pub fn eval(args: EvalArgs, registry: &Registry) -> Result<()> {
    let dataset = read_papers(&args.data)?;
    let gold_column = "Keywords";
    if dataset.column_index(gold_column).is_none() {
        bail!(
            "{} has no `{gold_column}` column (columns: {}): keywords-eval needs the gold keywords",
            args.data.display(),
            dataset.columns.join(",")
        );
    }
    let training: Vec<usize> = (0..dataset.len())
        .filter(|&i| !is_report_row(i, args.every))
        .collect();
    let mut scored: Vec<usize> = if args.training_rows {
        training.clone()
    } else {
        (0..dataset.len())
            .filter(|&i| is_report_row(i, args.every))
            .collect()
    };
    if args.limit > 0 {
        scored.truncate(args.limit);
    }
    if scored.is_empty() {
        bail!(
            "no rows to score in {} ({} rows, every {}th a report row)",
            args.data.display(),
            dataset.len(),
            args.every
        );
    }
    let paper = |i: usize| Paper::of(&dataset, &dataset.records[i]);
    let extractor: Box<dyn KeywordExtractor> = match &args.adapter {
        Some(dir) => {
            adapter_extractor(dir, &dataset, registry, args.max_new_tokens, args.min_score)?
        }
        None => Box::new(StatisticalExtractor::fit(
            training.iter().map(|&i| paper(i)),
            StatisticalSettings::default(),
        )),
    };
    let split = format!(
        "{} rows (0-based index % {} {} 0)",
        if args.training_rows {
            "training"
        } else {
            "report"
        },
        args.every,
        if args.training_rows { "!=" } else { "==" }
    );
    eprintln!(
        "keywords-eval: {} extractor on {} {split} of {}",
        extractor.name(),
        scored.len(),
        args.data.display()
    );
    let started = Instant::now();
    let progress = Progress::new(scored.len());
    let mut rows = Vec::with_capacity(scored.len());
    for (n, &i) in scored.iter().enumerate() {
        let record = &dataset.records[i];
        let predicted = extractor
            .extract(&paper(i))
            .with_context(|| format!("{} row {}", args.data.display(), record.row))?;
        rows.push(ScoredRow {
            uuid: &record.uuid,
            index: i,
            gold: parse_keywords(dataset.field(record, gold_column).unwrap_or("")),
            predicted,
        });
        progress.done(n + 1);
    }
    let predicted: Vec<Vec<String>> = rows.iter().map(|r| r.predicted.clone()).collect();
    let gold: Vec<Vec<String>> = rows.iter().map(|r| r.gold.clone()).collect();
    let report = EvalReport {
        extractor: extractor.name(),
        data: &args.data,
        split,
        seconds: started.elapsed().as_secs_f64(),
        scores: score(&predicted, &gold),
        rows,
    };
    if let Some(path) = &args.out {
        graft_model::formats::safetensors::write_atomic(
            path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{}: exact-match F1 {:.4}  partial-match F1 {:.4}  on {} {}  ({:.1} keywords predicted, {:.1} gold, {:.0} s)",
        report.extractor,
        report.scores.exact_f1,
        report.scores.partial_f1,
        report.scores.papers,
        report.split,
        report.scores.mean_predicted,
        report.scores.mean_gold,
        report.seconds
    );
    Ok(())
}

/// The extractor of the keyword adapter `dir`, checked against the columns of `dataset`: a
/// token classifier's (`graft train` with `model.pooling = "tokens"`) tags, keeping spans of
/// mean tag probability from `min_score` up; else a decoder's generated answer, at most
/// `max_new_tokens` tokens.
fn adapter_extractor(
    dir: &Path,
    dataset: &Dataset,
    registry: &Registry,
    max_new_tokens: usize,
    min_score: f64,
) -> Result<Box<dyn KeywordExtractor>> {
    let device = graft_model::default_device()?;
    let context = || format!("loading the keyword adapter in {}", dir.display());
    let tagger = dir.join(graft_trainer::task::TASK_FILE).is_file()
        && TaskSpec::read(dir).with_context(context)?.pooling == Pooling::Tokens;
    let (extractor, columns): (Box<dyn KeywordExtractor>, Vec<String>) = if tagger {
        let extractor =
            TaggingExtractor::open(dir, registry, &device, min_score).with_context(context)?;
        let columns = extractor.columns().iter().map(|c| c.to_string()).collect();
        (Box::new(extractor), columns)
    } else {
        let extractor = GenerativeExtractor::open(dir, registry, &device, max_new_tokens)
            .with_context(context)?;
        let columns = extractor.columns().iter().map(|c| c.to_string()).collect();
        (Box::new(extractor), columns)
    };
    for column in columns {
        if dataset.column_index(&column).is_none() {
            bail!(
                "{} has no `{column}` column, which the keyword adapter's template reads (columns: {})",
                dataset.path.display(),
                dataset.columns.join(",")
            );
        }
    }
    Ok(extractor)
}

/// Every row's keywords for a submission (`dataset` has `title` and `abstract`), in the challenge's spelling: from the generative
/// extractor of `adapter` (the baseline's where it finds none), else from the statistical
/// baseline fitted on the file's own titles and abstracts.
pub fn submission_keywords(
    dataset: &Dataset,
    adapter: Option<&Path>,
    registry: &Registry,
) -> Result<Vec<String>> {
    let data = &dataset.path;
    let papers = || dataset.records.iter().map(|r| Paper::of(dataset, r));
    let statistical = StatisticalExtractor::fit(papers(), StatisticalSettings::default());
    let from_adapter = adapter
        .map(|dir| adapter_extractor(dir, dataset, registry, 64, DEFAULT_MIN_SCORE))
        .transpose()?;
    let with_fallback = from_adapter
        .as_deref()
        .map(|a| WithFallback::new(a, &statistical));
    let extractor: &dyn KeywordExtractor = match &with_fallback {
        Some(w) => w,
        None => &statistical,
    };
    eprintln!(
        "keywords: {} extractor on {} rows",
        extractor.name(),
        dataset.len()
    );
    let progress = Progress::new(dataset.len());
    let mut keywords = Vec::with_capacity(dataset.len());
    for (n, paper) in papers().enumerate() {
        let record = &dataset.records[n];
        let found = extractor
            .extract(&paper)
            .with_context(|| format!("{} row {}", data.display(), record.row))?;
        if found.is_empty() {
            bail!(
                "{} row {} (uuid {}): no keyword found in its title and abstract",
                data.display(),
                record.row,
                record.uuid
            );
        }
        keywords.push(format_keywords(&found));
        progress.done(n + 1);
    }
    if let Some(w) = &with_fallback {
        eprintln!(
            "keywords: {} of {} rows had no generated keyword and took the statistical baseline's",
            w.fell_back(),
            dataset.len()
        );
    }
    Ok(keywords)
}
