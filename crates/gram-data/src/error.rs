//! The error type of gram-data. Its variant says whose fault a failure is, and so the exit code:
//! every variant but [`Error::Internal`] is about the user's input or environment (exit 1) and
//! names the file, spec or option at fault; `Internal` is a broken invariant (exit 2).

use std::path::PathBuf;

/// Result alias of gram-data.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Command-line options that cannot be used together or are out of range.
    #[error("{0}")]
    Options(String),
    /// A pipeline spec that cannot be used: its TOML, columns, SQL or file patterns.
    #[error("{path}: {msg}")]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An input file that cannot be read as its spec declares (a row that cannot is a reject,
    /// not an error).
    #[error("{path}: {msg}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong, and where in the file.
        msg: String,
    },
    /// The model's tokenizer or chat template could not be loaded or used.
    #[error("{context}: {source}")]
    Model {
        /// What was being done, naming the model.
        context: String,
        /// gram-core's error.
        source: gram_core::Error,
    },
    /// The output could not be written (a folder, a shard, the manifest).
    #[error("{path}: {msg}")]
    Output {
        /// The file or folder being written.
        path: PathBuf,
        /// The OS's or the writer's error.
        msg: String,
    },
    /// An object-store output (`--out s3://...`, `file://...`) that could not be opened,
    /// listed, written or deleted; the message names the URL.
    #[error("{0}")]
    Store(String),
    /// A plan that could not be run where `--cluster` sent it: the scheduler cannot be reached,
    /// or a task of the plan failed (an input file or the model it could not read, among others).
    #[error("--cluster {target}: {msg}")]
    Cluster {
        /// The target as given.
        target: String,
        /// DataFusion's or Ballista's error.
        msg: String,
    },
    /// Inside a plan: the task whose rows a task reads failed (with this message, already the
    /// one the user sees: [`gram_session::one_line`]).
    #[error("{0}")]
    Upstream(String),
    /// A broken invariant: a bug in gram-data, not in the input.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Spec`] for `path`.
    pub fn spec(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::Spec {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    /// An [`Error::Input`] for `path`.
    pub fn input(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::Input {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    /// An [`Error::Output`] for `path`.
    pub fn output(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Self::Output {
            path: path.into(),
            msg: err.to_string(),
        }
    }

    /// An [`Error::Internal`].
    pub fn internal(what: impl std::fmt::Display) -> Self {
        Self::Internal(what.to_string())
    }

    /// The failure of a plan on `target` whose message (one line) is `msg`: an
    /// [`Error::Internal`] when a task failed with one, else an [`Error::Cluster`].
    pub(crate) fn of_plan(target: &str, msg: String) -> Self {
        match msg.strip_prefix(INTERNAL) {
            Some(rest) => Self::Internal(format!("--cluster {target}: {rest}")),
            None => Self::Cluster {
                target: target.to_string(),
                msg,
            },
        }
    }

    /// True when the error is the input's (or the environment's) fault, not ours.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Internal(_) => false,
            Self::Model { source, .. } => source.is_user_error(),
            _ => true,
        }
    }
}

/// How an [`Error::Internal`]'s message starts.
const INTERNAL: &str = "internal error (please report): ";

/// Turns a foreign error into an [`Error::Internal`] naming what was being done: for the steps
/// that fail only on a bug (building an Arrow batch from columns this crate made, say).
pub(crate) trait OrInternal<T> {
    /// The value, or an internal error saying `what` failed.
    fn or_internal(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> OrInternal<T> for std::result::Result<T, E> {
    fn or_internal(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::Internal(format!("{what}: {e}")))
    }
}

impl<T> OrInternal<T> for Option<T> {
    fn or_internal(self, what: &str) -> Result<T> {
        self.ok_or_else(|| Error::Internal(what.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_internal_error_stays_internal() {
        let task = Error::internal("the plan made no Stage1 example").to_string();
        assert!(task.starts_with(INTERNAL), "{task}");
        let e = Error::of_plan("standalone", task);
        assert!(!e.is_user_error(), "{e}");
        assert!(
            e.to_string()
                .contains("--cluster standalone: the plan made no"),
            "{e}"
        );
        let e = Error::of_plan("standalone", "x.jsonl.gz: unreadable".into());
        assert!(
            e.is_user_error() && e.to_string() == "--cluster standalone: x.jsonl.gz: unreadable"
        );
    }
}
