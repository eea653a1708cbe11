//! What names a model on the hub, and the token that opens it.

/// A model repository on the hub at a revision (a branch, tag or commit; `main` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `owner/name` or `owner/name@revision`, with the hub's rules for names (letters, digits,
    /// `-`, `_`, `.`; not starting or ending with `-` or `.`, no `--` or `..`); `None` for
    /// anything else, so that `./runs/x`, `/data/m` or `a/b/c` are never taken for one.
    pub fn parse(text: &str) -> Option<HubId> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (text, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let valid_revision = !revision.is_empty()
            && !revision.starts_with('/')
            && !revision.split('/').any(|part| part == ".." || part == ".")
            && !revision.chars().any(|c| c.is_whitespace() || c == '\\');
        (valid_name(owner) && valid_name(name) && valid_revision).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 96
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("--")
        && !name.contains("..")
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// A hub token. Its `Debug` print is redacted and graft never logs it: it travels only in the
/// `authorization` header to the hub's host.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    /// The token itself, for the `authorization` header.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl From<&str> for Token {
    fn from(token: &str) -> Token {
        Token::new(token)
    }
}
